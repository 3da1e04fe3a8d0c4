//! The typed records of the catalog and where each lives (its key). Every record is versioned
//! with the catalog's schema ([`super::schema`]): a field added later carries a serde default, so
//! records written by older builds still decode.

use serde::{Deserialize, Serialize};

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
    /// Most stored bytes the account's snapshots may reference (`user set --quota`); absent:
    /// no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    /// argon2id PHC string of the account's delete passphrase (`user set --delete-passphrase`):
    /// deleting, unprotecting and lowering retention need it in the request. Absent: FULL access
    /// alone suffices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_passphrase: Option<String>,
    /// A restricted account (`user add --role`): `write-only` or `log-only` (see
    /// [`crate::access::Role`]). Absent: the rules alone decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// A one-time enrollment token waiting to be redeemed (`enroll/<hex of BLAKE3(auth half)>`):
/// the appliance never holds the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentRecord {
    /// The account it creates.
    pub identity: String,
    /// The account's role (`write-only`, `log-only`), absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub expires_us: i64,
    /// Hex of the member file sealed under the token's key half (empty in managed mode).
    #[serde(default)]
    pub sealed_keys: String,
    /// Who created it.
    pub created_by: String,
}

/// Where each kind of record lives.
pub(crate) mod key {
    use coffer_proto::SnapshotId;

    pub fn user(identity: &str) -> String {
        format!("user/{identity}")
    }
    pub fn enrollment(auth_hash_hex: &str) -> String {
        format!("enroll/{auth_hash_hex}")
    }
    pub fn rule(id: &str) -> String {
        format!("acl/{id}")
    }
    pub fn snapshot(id: &SnapshotId) -> String {
        format!("snap/{id}")
    }
    pub fn setting(name: &str) -> String {
        format!("setting/{name}")
    }
    /// The snapshot an identity committed with a commit id (its 16 bytes as the value).
    pub fn commit(identity: &str, commit_id: &[u8]) -> String {
        format!("commit/{identity}/{}", hex::encode(commit_id))
    }
    /// The policy of a target (`global`, `@host`, `user@host`, `user@host:/path`).
    pub fn policy(target: &crate::catalog::policy::PolicyTarget) -> String {
        format!("policy/{target}")
    }
    pub const POLICIES: &[u8] = b"policy/";
    pub const USERS: &[u8] = b"user/";
    pub const RULES: &[u8] = b"acl/";
    pub const SNAPSHOTS: &[u8] = b"snap/";
    /// The catalog's schema version (u32, little-endian).
    pub const SCHEMA: &[u8] = b"meta/schema";
}
