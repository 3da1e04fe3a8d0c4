//! The catalog: users, access rules, snapshots (with their protections and retention locks),
//! policies, settings and the [`audit`] chain. Small and transactional: one RocksDB instance under `catalog/`, every write
//! synced, a snapshot committed by exactly one write (its single commit point); with a running
//! appliance every write is then also appended to the [`journal`] in the packs.
//!
//! Keys: `user/<identity>` -> JSON [`UserRecord`]; `snap/<id hex>` -> protobuf `coffer.v1.Snapshot`;
//! `acl/<rule id>` -> JSON [`crate::access::rules::Rule`]; `setting/<name>` -> UTF-8 value;
//! `policy/<target>` -> JSON [`policy::Policy`];
//! `commit/<identity>/<commit id hex>` -> the 16-byte id of the snapshot committed with that
//! commit id (idempotent commits); `audit/<n>` and `meta/audit_head` -> the [`audit`] chain;
//! `meta/schema` -> the schema version ([`schema`]), checked and
//! migrated at every open.
//!
//! Owns: the catalog database and its records. Must never touch packs or shard indexes, nor
//! decide access (that is [`crate::access`]).

pub mod audit;
pub mod journal;
pub mod policy;
mod records;
pub mod schema;

use policy::{Policy, PolicyTarget};
use records::key;
pub use records::{EnrollmentRecord, UserRecord};

use std::path::Path;
use std::sync::Arc;

use coffer_proto::{v1, SnapshotId};
use prost::Message;
/// Why a catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database error: {0}")]
    Engine(String),
    #[error("the catalog at {path} is in use (is the appliance running? stop it first): {why}")]
    Locked { path: String, why: String },
    #[error("catalog record {key} does not decode: {why}")]
    Decode { key: String, why: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("the catalog has schema version {found}, newer than this build's {supported}; run a newer coffer-appliance")]
    Newer { found: u32, supported: u32 },
    /// A protection or a retention lock keeps the snapshot (or the change would shorten a lock).
    #[error("{0}")]
    Held(String),
    #[error("the change is in the catalog but not yet in its journal (the next change writes a checkpoint): {0}")]
    Journal(#[from] journal::JournalError),
}

/// The catalog database.
pub struct Catalog {
    db: rocksdb::DB,
    /// Serialises snapshot commits and deletes: the check for an earlier commit with the same
    /// commit id and the write of a new one are one step.
    commits: std::sync::Mutex<()>,
    /// Serialises policy changes: a change is read, merged, checked and written as one step
    /// (held across [`Catalog::audited`]'s write by the callers, see [`Catalog::policy_guard`]).
    policies: std::sync::Mutex<()>,
    /// The journal in the packs, once the running appliance attached it (offline tools write
    /// the catalog alone; the next start checkpoints what they changed).
    journal: std::sync::Mutex<Option<(journal::Journal, crate::repo::RepoPaths)>>,
    /// Called after each journaled change, before it is answered (`--ack-after remote`: the
    /// journal reaches the object store first).
    confirm: std::sync::OnceLock<Confirm>,
}

/// See [`Catalog::confirm_with`].
pub type Confirm = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What [`Catalog::commit_snapshot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// A new snapshot with this id.
    New(SnapshotId),
    /// A retry of an earlier commit (same identity, same commit id): its snapshot.
    Earlier(SnapshotId),
}

impl Committed {
    /// The snapshot's id.
    #[must_use]
    pub fn id(self) -> SnapshotId {
        match self {
            Self::New(id) | Self::Earlier(id) => id,
        }
    }
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Catalog")
    }
}

fn ce(e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Engine(e.to_string())
}

fn bad(key: &[u8], e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        why: e.to_string(),
    }
}

impl Catalog {
    /// Opens (or with `create`, creates) the catalog.
    ///
    /// # Errors
    /// A clear message when the catalog is locked by a running appliance.
    pub fn open(path: &Path, create: bool) -> Result<Self, CatalogError> {
        if create {
            // The catalog directory's own name must be durable (RocksDB syncs only inside it).
            crate::repo::create_dir_durable(path)
                .map_err(|e| CatalogError::Engine(format!("creating {}: {e}", path.display())))?;
        }
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(create);
        // Opening must need little free space (a full disk, `server::emergency_space`): a new
        // MANIFEST is written at every open, preallocated to 4 MiB by default.
        opts.set_manifest_preallocation_size(64 << 10);
        let db = rocksdb::DB::open(&opts, path).map_err(|e| {
            if e.to_string().contains("lock") {
                CatalogError::Locked {
                    path: path.display().to_string(),
                    why: e.to_string(),
                }
            } else {
                ce(e)
            }
        })?;
        let catalog = Self {
            db,
            commits: std::sync::Mutex::new(()),
            policies: std::sync::Mutex::new(()),
            journal: std::sync::Mutex::new(None),
            confirm: std::sync::OnceLock::new(),
        };
        schema::migrate(&catalog)?;
        Ok(catalog)
    }

    /// A raw value (schema and migrations).
    pub(crate) fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CatalogError> {
        self.db.get(key).map_err(ce)
    }

    /// Writes a raw value, synced (schema and migrations).
    pub(crate) fn put_raw(&self, key: &[u8], value: &[u8]) -> Result<(), CatalogError> {
        self.put(key, value)
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), CatalogError> {
        self.write(&[(key.to_vec(), Some(value.to_vec()))])
    }

    /// The whole catalog for a journal checkpoint.
    fn checkpoint_state(&self) -> Result<Vec<journal::Op>, journal::JournalError> {
        self.dump().map_err(|e| journal::JournalError::Corrupt {
            path: "catalog/".into(),
            why: e.to_string(),
        })
    }

    /// Every key and value (a journal checkpoint, `rebuild-catalog`'s check).
    ///
    /// # Errors
    /// Engine errors.
    pub fn dump(&self) -> Result<Vec<journal::Op>, CatalogError> {
        self.db
            .iterator(rocksdb::IteratorMode::Start)
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), Some(v.to_vec()))).map_err(ce))
            .collect()
    }

    /// From now on every write is also appended to the journal in the packs, after a checkpoint
    /// of the whole catalog (which takes in what offline tools changed).
    ///
    /// # Errors
    /// Engine and journal errors.
    pub fn attach_journal(
        &self,
        paths: &crate::repo::RepoPaths,
        encryption: std::sync::Arc<dyn crate::crypto::Encryption>,
        repo_id: coffer_proto::RepositoryId,
    ) -> Result<(), CatalogError> {
        let mut slot = self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = self.dump()?;
        let count = |ops: &mut dyn Iterator<Item = &[u8]>| {
            ops.filter(|k| k.starts_with(key::USERS) || k.starts_with(key::SNAPSHOTS))
                .count()
        };
        let have = count(&mut state.iter().map(|(k, _)| k.as_slice()));
        if have == 0 {
            // An empty catalog over a journal that knows accounts or snapshots: `catalog/` was
            // lost or replaced. A checkpoint now would erase the journal's record of them.
            if let Ok(r) = journal::replay(paths, encryption.as_ref(), repo_id) {
                let known = count(&mut r.state.keys().map(Vec::as_slice));
                if known > 0 {
                    return Err(CatalogError::Journal(journal::JournalError::Corrupt {
                        path: journal::dir(paths).display().to_string(),
                        why: format!(
                            "catalog/ holds no account and no snapshot, but the journal records \
                             {known}: catalog/ was lost or replaced. Stop, move catalog/ aside \
                             and run `coffer-appliance rebuild-catalog`"
                        ),
                    }));
                }
            }
        }
        let j = journal::Journal::start(paths, encryption, repo_id, &state)?;
        *slot = Some((j, paths.clone()));
        Ok(())
    }

    /// Writes a checkpoint into a new journal segment if the last journal write failed, so that
    /// the journal again holds every change (maintenance runs only then: collecting the chunks
    /// of a snapshot whose deletion the journal missed would let a rebuild bring it back broken).
    ///
    /// # Errors
    /// The checkpoint's I/O errors.
    pub fn repair_journal(&self) -> Result<(), CatalogError> {
        let mut slot = self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((j, paths)) = slot.as_mut() {
            if j.is_broken() {
                j.append(paths, &[], || self.checkpoint_state())?;
            }
        }
        Ok(())
    }

    /// Writes a new catalog from a journal's replay (`rebuild-catalog`).
    ///
    /// # Errors
    /// Engine errors.
    pub fn restore(
        &self,
        state: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Result<(), CatalogError> {
        self.write(
            &state
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect::<Vec<_>>(),
        )
    }

    /// Looks up a user.
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn user(&self, identity: &str) -> Result<Option<UserRecord>, CatalogError> {
        let k = key::user(identity);
        match self.db.get(&k).map_err(ce)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| bad(k.as_bytes(), e)),
        }
    }

    /// Creates a user; fails if it exists.
    ///
    /// # Errors
    /// [`CatalogError::Exists`] when the user exists.
    pub fn add_user(&self, rec: &UserRecord) -> Result<(), CatalogError> {
        if self.user(&rec.identity)?.is_some() {
            return Err(CatalogError::Exists(format!(
                "user {} already exists",
                rec.identity
            )));
        }
        self.put(
            key::user(&rec.identity).as_bytes(),
            &serde_json::to_vec(rec).map_err(ce)?,
        )
    }

    /// Replaces an existing user's record (password change).
    ///
    /// # Errors
    /// [`CatalogError::NotFound`] when the user does not exist.
    pub fn set_user(&self, rec: &UserRecord) -> Result<(), CatalogError> {
        if self.user(&rec.identity)?.is_none() {
            return Err(CatalogError::NotFound(format!("no user {}", rec.identity)));
        }
        self.put(
            key::user(&rec.identity).as_bytes(),
            &serde_json::to_vec(rec).map_err(ce)?,
        )
    }

    /// Stores an enrollment token's record, audited as `enroll.create` by `actor`.
    ///
    /// # Errors
    /// [`CatalogError::Exists`] when the account exists already.
    pub fn put_enrollment(
        &self,
        auth_hash_hex: &str,
        rec: &EnrollmentRecord,
    ) -> Result<(), CatalogError> {
        if self.user(&rec.identity)?.is_some() {
            return Err(CatalogError::Exists(format!(
                "user {} already exists: an enrollment token creates a new account",
                rec.identity
            )));
        }
        let event = audit::Event::done(&rec.created_by, "enroll.create", &rec.identity)
            .with_detail(format!(
                "role {} until {}",
                rec.role.as_deref().unwrap_or("none"),
                coffer_proto::when::format_us(rec.expires_us)
            ));
        self.write_audited(
            &[(
                key::enrollment(auth_hash_hex).into_bytes(),
                Some(serde_json::to_vec(rec).map_err(ce)?),
            )],
            Some(&event),
        )
    }

    /// An enrollment token's record.
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn enrollment(
        &self,
        auth_hash_hex: &str,
    ) -> Result<Option<EnrollmentRecord>, CatalogError> {
        let k = key::enrollment(auth_hash_hex);
        match self.db.get(&k).map_err(ce)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| bad(k.as_bytes(), e)),
        }
    }

    /// Redeems a token: in one synced batch its record is deleted and the account `user`
    /// created (`user: None`: only deleted, an expired token). The caller serialises
    /// redemptions (a token is used once).
    ///
    /// # Errors
    /// [`CatalogError::Exists`] when the account exists already.
    pub fn redeem_enrollment(
        &self,
        auth_hash_hex: &str,
        user: Option<&UserRecord>,
    ) -> Result<(), CatalogError> {
        let mut ops = vec![(key::enrollment(auth_hash_hex).into_bytes(), None)];
        let Some(user) = user else {
            return self.write(&ops);
        };
        if self.user(&user.identity)?.is_some() {
            return Err(CatalogError::Exists(format!(
                "user {} already exists",
                user.identity
            )));
        }
        ops.push((
            key::user(&user.identity).into_bytes(),
            Some(serde_json::to_vec(user).map_err(ce)?),
        ));
        let event = audit::Event::done(&user.identity, "enroll.redeem", &user.identity)
            .with_detail(user.role.clone().unwrap_or_else(|| "no role".into()));
        self.write_audited(&ops, Some(&event))
    }

    /// Deletes a user (their snapshots stay, owned by the identity).
    ///
    /// # Errors
    /// [`CatalogError::NotFound`] when the user does not exist.
    pub fn delete_user(&self, identity: &str) -> Result<(), CatalogError> {
        if self.user(identity)?.is_none() {
            return Err(CatalogError::NotFound(format!("no user {identity}")));
        }
        self.delete(key::user(identity).as_bytes())
    }

    fn delete(&self, key: &[u8]) -> Result<(), CatalogError> {
        self.write(&[(key.to_vec(), None)])
    }

    fn prefixed<T>(
        &self,
        prefix: &[u8],
        decode: impl Fn(&[u8]) -> Result<T, String>,
    ) -> Result<Vec<T>, CatalogError> {
        self.prefixed_kv(prefix, |_, v| decode(v))
    }

    /// Every record under `prefix`, decoded from its key (without the prefix) and value.
    fn prefixed_kv<T>(
        &self,
        prefix: &[u8],
        decode: impl Fn(&[u8], &[u8]) -> Result<T, String>,
    ) -> Result<Vec<T>, CatalogError> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(prefix) {
            let (k, v) = item.map_err(ce)?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push(decode(&k[prefix.len()..], &v).map_err(|e| bad(&k, e))?);
        }
        Ok(out)
    }

    /// The policy stored at `target`, if any.
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn policy(&self, target: &PolicyTarget) -> Result<Option<Policy>, CatalogError> {
        let k = key::policy(target);
        match self.db.get(&k).map_err(ce)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| bad(k.as_bytes(), e)),
        }
    }

    /// Stores the policy of `target` (replacing the stored one).
    ///
    /// # Errors
    /// Engine errors.
    pub fn put_policy(&self, target: &PolicyTarget, p: &Policy) -> Result<(), CatalogError> {
        self.put(
            key::policy(target).as_bytes(),
            &serde_json::to_vec(p).map_err(ce)?,
        )
    }

    /// Deletes the policy of `target`.
    ///
    /// # Errors
    /// [`CatalogError::NotFound`] when none is stored there.
    pub fn delete_policy(&self, target: &PolicyTarget) -> Result<(), CatalogError> {
        if self.policy(target)?.is_none() {
            return Err(CatalogError::NotFound(format!("no policy at {target}")));
        }
        self.delete(key::policy(target).as_bytes())
    }

    /// Every stored policy, by target.
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn policies(&self) -> Result<Vec<(PolicyTarget, Policy)>, CatalogError> {
        self.prefixed_kv(key::POLICIES, |k, v| {
            let t = std::str::from_utf8(k).map_err(|e| e.to_string())?;
            let t = PolicyTarget::parse(t).map_err(|e| e.to_string())?;
            Ok((t, serde_json::from_slice(v).map_err(|e| e.to_string())?))
        })
    }

    /// Stored access rules (none: the defaults apply).
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn acl_rules(&self) -> Result<Vec<crate::access::rules::Rule>, CatalogError> {
        self.prefixed(key::RULES, |v| {
            serde_json::from_slice(v).map_err(|e| e.to_string())
        })
    }

    /// Held while a policy level is read, changed and written: two changes of one level never
    /// build on the same old record.
    pub fn policy_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores `rule` over the stored rule with its id (`acl enable --append-only-defaults`
    /// narrowing a built-in rule).
    ///
    /// # Errors
    /// Engine errors.
    pub fn replace_rule(&self, rule: &crate::access::rules::Rule) -> Result<(), CatalogError> {
        self.put(
            key::rule(&rule.id).as_bytes(),
            &serde_json::to_vec(rule).map_err(ce)?,
        )
    }

    /// Stores a rule.
    ///
    /// # Errors
    /// Engine errors; [`CatalogError::Exists`] when the id exists.
    pub fn put_rule(&self, rule: &crate::access::rules::Rule) -> Result<(), CatalogError> {
        let key = key::rule(&rule.id);
        if self.db.get(&key).map_err(ce)?.is_some() {
            return Err(CatalogError::Exists(format!("rule {} exists", rule.id)));
        }
        self.put(key.as_bytes(), &serde_json::to_vec(rule).map_err(ce)?)
    }

    /// Deletes a rule.
    ///
    /// # Errors
    /// [`CatalogError::NotFound`] when there is no such rule.
    pub fn delete_rule(&self, id: &str) -> Result<(), CatalogError> {
        let key = key::rule(id);
        if self.db.get(&key).map_err(ce)?.is_none() {
            return Err(CatalogError::NotFound(format!("no rule {id}")));
        }
        self.delete(key.as_bytes())
    }

    /// A repository setting (`setting/<name>`).
    ///
    /// # Errors
    /// Engine errors.
    pub fn setting(&self, name: &str) -> Result<Option<String>, CatalogError> {
        Ok(self
            .db
            .get(key::setting(name))
            .map_err(ce)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Stores a repository setting.
    ///
    /// # Errors
    /// Engine errors.
    pub fn set_setting(&self, name: &str, value: &str) -> Result<(), CatalogError> {
        self.put(key::setting(name).as_bytes(), value.as_bytes())
    }

    /// Every user, sorted.
    ///
    /// # Errors
    /// Engine errors.
    pub fn users(&self) -> Result<Vec<UserRecord>, CatalogError> {
        self.prefixed(key::USERS, |v| {
            serde_json::from_slice(v).map_err(|e| e.to_string())
        })
    }

    /// Commits a snapshot: one synced write (the record and, with a commit id, the commit key
    /// `commit/<identity>/<commit id>`) is the commit point. A snapshot whose identity already
    /// committed one with the same commit id is not written again: the earlier one is answered.
    ///
    /// # Errors
    /// Engine errors.
    pub fn commit_snapshot(&self, snap: &v1::Snapshot) -> Result<Committed, CatalogError> {
        let id = SnapshotId::from_slice(&snap.id).map_err(|e| bad(b"snap/", e))?;
        let _one = self
            .commits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut ops = Vec::new();
        if !snap.commit_id.is_empty() {
            let ck = key::commit(&snap.identity, &snap.commit_id);
            if let Some(v) = self.db.get(&ck).map_err(ce)? {
                let earlier = SnapshotId::from_slice(&v).map_err(|e| bad(ck.as_bytes(), e))?;
                if let Some(e) = self.snapshot(&earlier)? {
                    if e.root != snap.root || e.path != snap.path {
                        return Err(CatalogError::Exists(format!(
                            "commit id {} was used for another snapshot ({earlier}) of {}; \
                             a new snapshot needs a new commit id",
                            hex::encode(&snap.commit_id),
                            e.path
                        )));
                    }
                    // A retried commit is answered only once its first write is confirmed too.
                    self.confirmed()?;
                    return Ok(Committed::Earlier(earlier));
                }
            }
            ops.push((ck.into_bytes(), Some(id.as_bytes().to_vec())));
        }
        ops.push((key::snapshot(&id).into_bytes(), Some(snap.encode_to_vec())));
        self.write(&ops)?;
        Ok(Committed::New(id))
    }

    /// The one way anything is written: one synced batch, then the same changes appended to
    /// the journal (after, so that the journal never holds a change the catalog refused).
    fn write(&self, ops: &[journal::Op]) -> Result<(), CatalogError> {
        self.write_audited(ops, None)
    }

    /// [`Self::write`] with `event` appended to the audit chain in the same batch (the chain's
    /// order is the order of writes: this lock serialises them).
    fn write_audited(
        &self,
        ops: &[journal::Op],
        event: Option<&audit::Event>,
    ) -> Result<(), CatalogError> {
        if event.is_none() && Pending::hold(ops) {
            return Ok(());
        }
        if event.is_some() && Pending::active() {
            // It would land before the change it belongs to, and stay if that change failed.
            return Err(CatalogError::Engine(
                "a write with its own audit entry inside an audited change".into(),
            ));
        }
        let mut slot = self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut owned;
        let ops = match event {
            None => ops,
            Some(e) => {
                let head = self.db.get(audit::HEAD).map_err(ce)?;
                owned = ops.to_vec();
                owned.extend(
                    audit::append_ops(head.as_deref(), e, crate::clock::now_us())
                        .map_err(|why| bad(audit::HEAD, why))?,
                );
                &owned[..]
            }
        };
        let mut batch = rocksdb::WriteBatch::default();
        for (k, v) in ops {
            match v {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            }
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(ce)?;
        if let Some((j, paths)) = slot.as_mut() {
            j.append(paths, ops, || self.checkpoint_state())?;
            // Under the journal's lock: confirmations come in the order of the writes.
            self.confirmed()?;
        }
        Ok(())
    }

    /// From now on every journaled change is answered only once `f` confirmed it (the object
    /// store holds the journal). Set once, by `serve`.
    pub fn confirm_with(&self, f: Confirm) {
        let _ = self.confirm.set(f);
    }

    fn confirmed(&self) -> Result<(), CatalogError> {
        match self.confirm.get() {
            Some(f) => f().map_err(|why| {
                CatalogError::Engine(format!(
                    "the change is durable here but the object store did not confirm it (it is \
                     uploaded later; retry): {why}"
                ))
            }),
            None => Ok(()),
        }
    }

    /// One snapshot.
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn snapshot(&self, id: &SnapshotId) -> Result<Option<v1::Snapshot>, CatalogError> {
        let k = key::snapshot(id);
        match self.db.get(&k).map_err(ce)? {
            None => Ok(None),
            Some(v) => v1::Snapshot::decode(&v[..])
                .map(Some)
                .map_err(|e| bad(k.as_bytes(), e)),
        }
    }

    /// Deletes a snapshot and its commit key, with `event` in the audit chain (one synced
    /// write). A snapshot that a protection or a retention lock holds at the appliance's clock
    /// is not deleted, by anyone (the caller records the refusal, within its budget).
    ///
    /// # Errors
    /// [`CatalogError::NotFound`]; [`CatalogError::Held`]; engine errors.
    pub fn delete_snapshot(
        &self,
        id: &SnapshotId,
        event: &audit::Event,
    ) -> Result<(), CatalogError> {
        let _one = self
            .commits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = self
            .snapshot(id)?
            .ok_or_else(|| CatalogError::NotFound(format!("no snapshot {id}")))?;
        if let Some(why) = held(&s, crate::clock::now_us()) {
            return Err(CatalogError::Held(why));
        }
        let mut ops = Vec::new();
        if !s.commit_id.is_empty() {
            ops.push((key::commit(&s.identity, &s.commit_id).into_bytes(), None));
        }
        ops.push((key::snapshot(id).into_bytes(), None));
        self.write_audited(&ops, Some(event))
    }

    /// Reads snapshot `id`, lets `change` check and change it, and writes it back with `event`
    /// in the audit chain — all under the commit lock, so the check sees the record as written.
    fn change_snapshot(
        &self,
        id: &SnapshotId,
        event: &audit::Event,
        change: impl FnOnce(&mut v1::Snapshot) -> Result<(), CatalogError>,
    ) -> Result<v1::Snapshot, CatalogError> {
        let _one = self
            .commits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut s = self
            .snapshot(id)?
            .ok_or_else(|| CatalogError::NotFound(format!("no snapshot {id}")))?;
        change(&mut s)?;
        self.write_audited(
            &[(key::snapshot(id).into_bytes(), Some(s.encode_to_vec()))],
            Some(event),
        )?;
        Ok(s)
    }

    /// Sets a snapshot's protection: `until_us` 0 removes it, `i64::MAX` protects until
    /// removed. Removing or shortening a protection in force needs `may_shorten` (the caller
    /// checked FULL access and the step-up; decided here against the record as it is now) and
    /// is refused while the snapshot is locked. `event` is recorded with the change.
    ///
    /// # Errors
    /// [`CatalogError::NotFound`]; [`CatalogError::Held`]; engine errors.
    pub fn protect_snapshot(
        &self,
        id: &SnapshotId,
        until_us: i64,
        may_shorten: bool,
        event: &audit::Event,
    ) -> Result<v1::Snapshot, CatalogError> {
        let now = crate::clock::now_us();
        self.change_snapshot(id, event, |s| {
            let until_us = until_us.max(0);
            if until_us < protection_in_force(s, now) {
                if !may_shorten {
                    return Err(CatalogError::Held(format!(
                        "snapshot {id} is protected; removing or shortening a protection needs \
                         FULL access and the account's delete passphrase"
                    )));
                }
                if s.lock_until_us > now {
                    return Err(CatalogError::Held(format!(
                        "snapshot {id} is locked until {}: nobody can unprotect it before then",
                        coffer_proto::when::format_us(s.lock_until_us)
                    )));
                }
            }
            s.protected_until_us = until_us;
            Ok(())
        })
    }

    /// Extends a snapshot's retention lock to `until_us`; a lock is never shortened.
    ///
    /// # Errors
    /// [`CatalogError::NotFound`]; [`CatalogError::Held`] for an earlier time; engine errors.
    pub fn extend_lock(
        &self,
        id: &SnapshotId,
        until_us: i64,
        event: &audit::Event,
    ) -> Result<v1::Snapshot, CatalogError> {
        self.change_snapshot(id, event, |s| {
            if until_us < s.lock_until_us {
                return Err(CatalogError::Held(format!(
                    "snapshot {id} is locked until {}; a lock can be extended, never shortened",
                    coffer_proto::when::format_us(s.lock_until_us)
                )));
            }
            s.lock_until_us = until_us;
            Ok(())
        })
    }

    /// Runs `f` as one audited change: every write `f` makes on this thread is held back, then
    /// written in one synced batch with `event` in the audit chain — or, when `f` fails, not at
    /// all. Reads inside `f` do not see its own writes.
    ///
    /// # Errors
    /// What `f` returns; the batch's engine and journal errors.
    pub fn audited<T, E: From<CatalogError>>(
        &self,
        event: &audit::Event,
        f: impl FnOnce(&Self) -> Result<T, E>,
    ) -> Result<T, E> {
        let guard = Pending::start();
        let out = f(self);
        let ops = Pending::take();
        drop(guard);
        let v = out?;
        self.write_audited(&ops, Some(event))?;
        Ok(v)
    }

    /// Appends `event` to the audit chain (one synced write).
    ///
    /// # Errors
    /// Engine errors; a broken head.
    pub fn audit(&self, event: &audit::Event) -> Result<(), CatalogError> {
        self.write_audited(&[], Some(event))
    }

    /// The audit entries at or after `since_us`, oldest first (entries that do not decode are
    /// left out: `audit verify` names them).
    ///
    /// # Errors
    /// Engine errors.
    pub fn audit_entries(&self, since_us: i64) -> Result<Vec<audit::Entry>, CatalogError> {
        Ok(self
            .prefixed(audit::PREFIX, |v| {
                Ok(serde_json::from_slice::<audit::Entry>(v).ok())
            })?
            .into_iter()
            .flatten()
            .filter(|e| e.time_us >= since_us)
            .collect())
    }

    /// Checks the audit chain.
    ///
    /// # Errors
    /// Engine errors.
    pub fn audit_verify(&self) -> Result<audit::Verified, CatalogError> {
        let entries = self.prefixed_kv(audit::PREFIX, |k, v| {
            let mut full = audit::PREFIX.to_vec();
            full.extend_from_slice(k);
            Ok((full, v.to_vec()))
        })?;
        Ok(audit::verify(
            &entries,
            self.get_raw(audit::HEAD)?.as_deref(),
        ))
    }

    /// Every snapshot.
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn snapshots(&self) -> Result<Vec<v1::Snapshot>, CatalogError> {
        self.prefixed(key::SNAPSHOTS, |v| {
            v1::Snapshot::decode(v).map_err(|e| e.to_string())
        })
    }
}

thread_local! {
    /// The writes held back by [`Catalog::audited`] on this thread.
    static PENDING: std::cell::RefCell<Option<Vec<journal::Op>>> =
        const { std::cell::RefCell::new(None) };
}

/// An [`Catalog::audited`] change in progress on this thread; dropping it (a panic in the
/// change) discards what was held back, so that no later write of the thread is captured.
struct Pending;

impl Pending {
    fn start() -> Self {
        PENDING.with(|p| {
            let mut p = p.borrow_mut();
            assert!(p.is_none(), "audited changes do not nest");
            *p = Some(Vec::new());
        });
        Self
    }

    /// Holds `ops` back when a change is in progress on this thread.
    fn hold(ops: &[journal::Op]) -> bool {
        PENDING.with(|p| match p.borrow_mut().as_mut() {
            Some(held) => {
                held.extend_from_slice(ops);
                true
            }
            None => false,
        })
    }

    fn active() -> bool {
        PENDING.with(|p| p.borrow().is_some())
    }

    /// The writes held back so far; ends the change in progress.
    fn take() -> Vec<journal::Op> {
        PENDING.with(|p| p.borrow_mut().take()).unwrap_or_default()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        PENDING.with(|p| p.borrow_mut().take());
    }
}

/// The end of `s`'s protection if it is still in force at `now_us`, else 0 (an expired
/// protection is no protection: removing it takes nothing away).
#[must_use]
pub fn protection_in_force(s: &v1::Snapshot, now_us: i64) -> i64 {
    if s.protected_until_us > now_us {
        s.protected_until_us
    } else {
        0
    }
}

/// Why `s` cannot be deleted or forgotten at `now_us`, if it cannot: a retention lock that has
/// not expired, or a protection.
#[must_use]
pub fn held(s: &v1::Snapshot, now_us: i64) -> Option<String> {
    let id = hex::encode(&s.id);
    if s.lock_until_us > now_us {
        return Some(format!(
            "snapshot {id} is locked until {} (retention lock); nobody can delete or forget it \
             before then",
            coffer_proto::when::format_us(s.lock_until_us)
        ));
    }
    if protection_in_force(s, now_us) > 0 {
        return Some(if s.protected_until_us == i64::MAX {
            format!("snapshot {id} is protected; unprotect it first")
        } else {
            format!(
                "snapshot {id} is protected until {}; unprotect it first",
                coffer_proto::when::format_us(s.protected_until_us)
            )
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use audit::{Event, Outcome};

    fn snap(c: &Catalog, n: u8, lock_until_us: i64) -> SnapshotId {
        let id = SnapshotId::from_bytes([n; 16]);
        let s = v1::Snapshot {
            id: bytes::Bytes::copy_from_slice(id.as_bytes()),
            identity: "alice@laptop".into(),
            path: "/data".into(),
            lock_until_us,
            ..v1::Snapshot::default()
        };
        c.commit_snapshot(&s).unwrap();
        id
    }

    #[test]
    fn held_snapshots_are_refused_to_every_caller_and_each_step_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("catalog"), true).unwrap();
        let far = crate::clock::now_us() + 3_600_000_000;
        let locked = snap(&c, 1, far);
        let plain = snap(&c, 2, 0);
        let ev = |a: &str| Event::done("admin", a, "x");

        assert!(matches!(
            c.delete_snapshot(&locked, &ev("snapshot.delete")),
            Err(CatalogError::Held(m)) if m.contains("locked until")
        ));
        assert!(matches!(
            c.extend_lock(&locked, far - 1, &ev("snapshot.lock")),
            Err(CatalogError::Held(_))
        ));
        assert_eq!(
            c.extend_lock(&locked, far + 1, &ev("snapshot.lock"))
                .unwrap()
                .lock_until_us,
            far + 1
        );
        // Protecting a locked snapshot adds; removing that protection is refused while locked.
        c.protect_snapshot(&locked, i64::MAX, true, &ev("snapshot.protect"))
            .unwrap();
        assert!(matches!(
            c.protect_snapshot(&locked, 0, true, &ev("snapshot.unprotect")),
            Err(CatalogError::Held(_))
        ));
        // A protection holds until removed; then the snapshot goes.
        c.protect_snapshot(&plain, i64::MAX, false, &ev("snapshot.protect"))
            .unwrap();
        // Shortening is decided against the record as it is now, not as the caller read it.
        assert!(matches!(
            c.protect_snapshot(&plain, 1, false, &ev("snapshot.protect")),
            Err(CatalogError::Held(m)) if m.contains("delete passphrase")
        ));
        assert!(matches!(
            c.delete_snapshot(&plain, &ev("snapshot.delete")),
            Err(CatalogError::Held(m)) if m.contains("protected")
        ));
        c.protect_snapshot(&plain, 0, true, &ev("snapshot.unprotect"))
            .unwrap();
        c.delete_snapshot(&plain, &ev("snapshot.delete")).unwrap();
        assert!(c.snapshot(&plain).unwrap().is_none());
        assert!(c.snapshot(&locked).unwrap().is_some());

        let log = c.audit_entries(0).unwrap();
        let outcomes: Vec<(&str, Outcome)> =
            log.iter().map(|e| (e.action.as_str(), e.outcome)).collect();
        assert_eq!(
            outcomes,
            [
                ("snapshot.lock", Outcome::Done),
                ("snapshot.protect", Outcome::Done),
                ("snapshot.protect", Outcome::Done),
                ("snapshot.unprotect", Outcome::Done),
                ("snapshot.delete", Outcome::Done),
            ]
        );
        let v = c.audit_verify().unwrap();
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.head.unwrap().seq, 5);
    }

    #[test]
    fn an_audited_change_is_written_whole_with_its_entry_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("catalog"), true).unwrap();
        let ev = Event::done("admin", "test.change", "x");
        let failed: Result<(), CatalogError> = c.audited(&ev, |c| {
            c.set_setting("one", "1")?;
            c.set_setting("two", "2")?;
            Err(CatalogError::NotFound("stop".into()))
        });
        assert!(failed.is_err());
        assert_eq!(
            c.setting("one").unwrap(),
            None,
            "nothing of a failed change"
        );
        assert!(c.audit_entries(0).unwrap().is_empty());
        c.audited(&ev, |c| {
            c.set_setting("one", "1")?;
            // Reads inside do not see the change's own writes.
            assert_eq!(c.setting("one")?, None);
            c.set_setting("two", "2")
        })
        .unwrap();
        assert_eq!(c.setting("two").unwrap().as_deref(), Some("2"));
        assert_eq!(c.audit_entries(0).unwrap().len(), 1);
        // A panic inside leaves no change in progress on the thread.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _: Result<(), CatalogError> = c.audited(&ev, |_| panic!("inside"));
        }));
        assert!(r.is_err());
        c.set_setting("three", "3").unwrap();
        assert_eq!(c.setting("three").unwrap().as_deref(), Some("3"));
    }
}
