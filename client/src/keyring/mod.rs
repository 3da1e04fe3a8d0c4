//! Keyrings: the keys of a sealed repository, which only clients ever hold.
//!
//! A keyring is one 32-byte **master secret** (in an offline file wrapped under a passphrase,
//! never on the appliance) from which every key is derived with BLAKE3's key derivation
//! (`docs/format.md`, "Keyrings"):
//!
//! * `K_id` keys chunk ids (keyed BLAKE3 of the plaintext), `K_conv` chunk keys (keyed BLAKE3 of
//!   the plaintext, so that identical plaintext seals to identical bytes within the keyring and
//!   deduplicates), `K_path` the opaque tags that stand for paths on the appliance;
//! * per key generation, an X25519 **data** key pair (chunk keys are wrapped to its public half:
//!   readers need the private half) and a **log** key pair (snapshot headers are sealed to it);
//! * an Ed25519 **master signing** key, which certifies members.
//!
//! A **member** file holds what its role needs and nothing more ([`Role`]): a write-only member
//! has the public halves, `K_id`, `K_conv`, `K_path` and its own signing key, so it can add
//! snapshots but open none. Every member has a certificate (its signing key, role and account,
//! signed by the master) that travels in each snapshot it writes.
//!
//! Owns: key derivation, the master and member files, certificates. The sealing itself is in
//! [`seal`]. Writes no primitive by hand: X25519 and Ed25519 are dalek's, AES-256-GCM ring's,
//! HKDF RustCrypto's, argon2id RustCrypto's.

pub mod enroll;
pub mod seal;

use std::collections::BTreeMap;
use std::path::Path;

use coffer_proto::{v1, DedupKey};
use ed25519_dalek::{Signer, Verifier};
use prost::Message;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ClientError;

/// What a member may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Back up, list, read and restore.
    ReadWrite,
    /// Back up only: no key opens a chunk or a header.
    WriteOnly,
    /// List only: opens headers, never a chunk.
    LogOnly,
}

impl Role {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::ReadWrite => "read-write",
            Self::WriteOnly => "write-only",
            Self::LogOnly => "log-only",
        }
    }

    /// # Errors
    /// A name other than the three roles.
    pub fn parse(s: &str) -> Result<Self, ClientError> {
        match s {
            "read-write" => Ok(Self::ReadWrite),
            "write-only" => Ok(Self::WriteOnly),
            "log-only" => Ok(Self::LogOnly),
            _ => Err(keyring(format!(
                "role {s:?}: expected read-write, write-only or log-only"
            ))),
        }
    }

    /// The account role the appliance enforces for this member (`user add --role`).
    #[must_use]
    pub fn account_role(self) -> Option<&'static str> {
        match self {
            Self::ReadWrite => None,
            Self::WriteOnly => Some("write-only"),
            Self::LogOnly => Some("log-only"),
        }
    }
}

pub(crate) fn keyring(why: impl Into<String>) -> ClientError {
    ClientError::Keyring(why.into())
}

type Key = [u8; 32];

fn derive(context: &str, secret: &Key, generation: Option<u32>) -> Key {
    let mut h = blake3::Hasher::new_derive_key(context);
    h.update(secret);
    if let Some(g) = generation {
        h.update(&g.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

const CTX_ID: &str = "coffer 2026 sealed chunk id key v1";
const CTX_CONV: &str = "coffer 2026 sealed chunk key key v1";
const CTX_PATH: &str = "coffer 2026 sealed path tag key v1";
const CTX_DATA: &str = "coffer 2026 sealed data key v1";
const CTX_LOG: &str = "coffer 2026 sealed log key v1";
const CTX_SIGN: &str = "coffer 2026 sealed master signing key v1";

fn x25519_public(secret: &Key) -> Key {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret)).to_bytes()
}

/// argon2id parameters of the master file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Kdf {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Kdf {
    /// 64 MiB, 3 passes: the master file is opened on an admin machine, rarely.
    pub const DEFAULT: Self = Self {
        m_cost_kib: 64 * 1024,
        t_cost: 3,
        p_cost: 1,
    };

    fn key(self, passphrase: &[u8], salt: &[u8]) -> Result<Zeroizing<Key>, ClientError> {
        let params = argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| keyring(format!("argon2 parameters: {e}")))?;
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut k = Zeroizing::new([0u8; 32]);
        a.hash_password_into(passphrase, salt, &mut *k)
            .map_err(|e| keyring(format!("argon2: {e}")))?;
        Ok(k)
    }
}

/// The master file as stored (JSON, mode 0600): the secret wrapped under argon2id of the
/// passphrase with AES-256-GCM; the keyring id and generation are authenticated with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MasterFile {
    format: u32,
    kind: String,
    keyring_id: String,
    generation: u32,
    kdf: Kdf,
    salt: String,
    wrapped: String,
    /// When each generation after the first started (Unix µs).
    #[serde(default)]
    rotations: BTreeMap<u32, i64>,
    /// Every member issued, newest issue last.
    #[serde(default)]
    members: Vec<Issued>,
}

/// A member the master issued (the master file's registry).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Issued {
    pub member: String,
    pub role: Role,
    pub generation: u32,
    /// When it was issued (Unix µs).
    pub at_us: i64,
    /// Set by `remove-member`: the keyring rotated away from it at this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_us: Option<i64>,
}

const MASTER_KIND: &str = "coffer keyring master";
const MEMBER_KIND: &str = "coffer keyring member";

/// An unwrapped keyring master.
pub struct Master {
    pub keyring_id: [u8; 16],
    /// The current key generation (from 1; `rotate` adds one).
    pub generation: u32,
    secret: Zeroizing<Key>,
    /// When each generation after the first started (Unix µs).
    pub rotations: BTreeMap<u32, i64>,
    /// Every member issued.
    pub members: Vec<Issued>,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Master({})", hex::encode(self.keyring_id))
    }
}

fn master_aad(id: &[u8; 16], generation: u32) -> Vec<u8> {
    let mut aad = b"coffer keyring master v1".to_vec();
    aad.extend_from_slice(id);
    aad.extend_from_slice(&generation.to_le_bytes());
    aad
}

fn hex32(s: &str, what: &str) -> Result<Key, ClientError> {
    let mut k = [0u8; 32];
    hex::decode_to_slice(s, &mut k).map_err(|_| keyring(format!("{what} is not 64 hex digits")))?;
    Ok(k)
}

impl Master {
    /// A new keyring (generation 1).
    #[must_use]
    pub fn generate() -> Self {
        Self {
            keyring_id: rand::random(),
            generation: 1,
            secret: Zeroizing::new(rand::random()),
            rotations: BTreeMap::new(),
            members: Vec::new(),
        }
    }

    /// The master file, wrapped under `passphrase`.
    ///
    /// # Errors
    /// argon2 failures.
    pub fn to_file(&self, passphrase: &str, kdf: Kdf) -> Result<String, ClientError> {
        let salt: [u8; 16] = rand::random();
        let kek = kdf.key(passphrase.as_bytes(), &salt)?;
        let wrapped = seal::aead_seal(
            &kek,
            &master_aad(&self.keyring_id, self.generation),
            &*self.secret,
        );
        let f = MasterFile {
            format: 1,
            kind: MASTER_KIND.into(),
            keyring_id: hex::encode(self.keyring_id),
            generation: self.generation,
            kdf,
            salt: hex::encode(salt),
            wrapped: hex::encode(wrapped),
            rotations: self.rotations.clone(),
            members: self.members.clone(),
        };
        serde_json::to_string_pretty(&f).map_err(|e| keyring(e.to_string()))
    }

    /// Opens a master file.
    ///
    /// # Errors
    /// Not a master file; a wrong passphrase.
    pub fn from_file(text: &str, passphrase: &str) -> Result<Self, ClientError> {
        let f: MasterFile = serde_json::from_str(text)
            .map_err(|e| keyring(format!("not a coffer keyring master file: {e}")))?;
        if f.kind != MASTER_KIND || f.format != 1 {
            return Err(keyring(format!(
                "not a coffer keyring master file (kind {:?}, format {})",
                f.kind, f.format
            )));
        }
        let mut id = [0u8; 16];
        hex::decode_to_slice(&f.keyring_id, &mut id)
            .map_err(|_| keyring("the master file's keyring id is not 32 hex digits"))?;
        let salt = hex::decode(&f.salt).map_err(|_| keyring("bad salt"))?;
        let wrapped = hex::decode(&f.wrapped).map_err(|_| keyring("bad wrapped secret"))?;
        let kek = f.kdf.key(passphrase.as_bytes(), &salt)?;
        let secret = seal::aead_open(&kek, &master_aad(&id, f.generation), &wrapped)
            .filter(|s| s.len() == 32)
            .ok_or_else(|| keyring("wrong passphrase for the keyring master file"))?;
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(&secret);
        Ok(Self {
            keyring_id: id,
            generation: f.generation,
            secret: k,
            rotations: f.rotations,
            members: f.members,
        })
    }

    fn signing(&self) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&derive(CTX_SIGN, &self.secret, None))
    }

    /// The key that certifies members.
    #[must_use]
    pub fn public(&self) -> Key {
        self.signing().verifying_key().to_bytes()
    }

    /// [`Master::issue`], recorded in the registry (save the master file afterwards).
    ///
    /// # Errors
    /// A member removed from the keyring (it would be trusted again).
    pub fn add_member(&mut self, member: &str, role: Role) -> Result<Member, ClientError> {
        if self
            .members
            .iter()
            .any(|m| m.member == member && m.removed_us.is_some())
        {
            return Err(keyring(format!(
                "{member} was removed from this keyring; issue keys to a new account instead"
            )));
        }
        let m = self.issue(member, role);
        self.members.push(Issued {
            member: member.to_string(),
            role,
            generation: self.generation,
            at_us: coffer_proto::now_us(),
            removed_us: None,
        });
        Ok(m)
    }

    /// Removes `member`: marks it removed and rotates (what is written from now on is sealed
    /// under keys it never held, and readers issued afterwards refuse snapshots still sealed
    /// under the old keys once they are newer than the rotation). Answers the members that
    /// must be issued again.
    ///
    /// # Errors
    /// A member this master never issued.
    pub fn remove_member(&mut self, member: &str) -> Result<Vec<Issued>, ClientError> {
        let now = coffer_proto::now_us();
        let mut found = false;
        for m in self.members.iter_mut().filter(|m| m.member == member) {
            m.removed_us.get_or_insert(now);
            found = true;
        }
        if !found {
            return Err(keyring(format!("{member} is not a member of this keyring")));
        }
        self.rotate();
        let mut keep: Vec<Issued> = Vec::new();
        for m in self.members.iter().filter(|m| m.removed_us.is_none()) {
            keep.retain(|k| k.member != m.member);
            keep.push(m.clone());
        }
        Ok(keep)
    }

    /// The member file of `member` (`username@hostname`) with `role`, under a fresh signing key.
    #[must_use]
    pub fn issue(&self, member: &str, role: Role) -> Member {
        let signing: Key = rand::random();
        let body = v1::MemberCertBody {
            keyring_id: self.keyring_id.to_vec().into(),
            member: member.to_string(),
            role: role.name().into(),
            signing_public: ed25519_dalek::SigningKey::from_bytes(&signing)
                .verifying_key()
                .to_bytes()
                .to_vec()
                .into(),
            generation: self.generation,
            issued_us: coffer_proto::now_us(),
        }
        .encode_to_vec();
        let cert = v1::MemberCert {
            signature: self.signing().sign(&body).to_bytes().to_vec().into(),
            body: body.into(),
        };
        let g = self.generation;
        let s = &self.secret;
        let gens = 1..=g;
        let reads = role == Role::ReadWrite;
        let lists = role != Role::WriteOnly;
        let writes = role != Role::LogOnly;
        Member {
            keyring_id: self.keyring_id,
            member: member.to_string(),
            role,
            generation: g,
            id_key: writes.then(|| derive(CTX_ID, s, None)),
            conv_key: writes.then(|| derive(CTX_CONV, s, None)),
            path_key: writes.then(|| derive(CTX_PATH, s, None)),
            data_public: x25519_public(&derive(CTX_DATA, s, Some(g))),
            data_secret: if reads {
                gens.clone()
                    .map(|i| (i, derive(CTX_DATA, s, Some(i))))
                    .collect()
            } else {
                BTreeMap::new()
            },
            log_public: x25519_public(&derive(CTX_LOG, s, Some(g))),
            log_secret: if lists {
                gens.map(|i| (i, derive(CTX_LOG, s, Some(i)))).collect()
            } else {
                BTreeMap::new()
            },
            signing: writes.then_some(signing),
            cert,
            master_public: self.public(),
            rotations: self.rotations.clone(),
        }
    }

    /// The next key generation: new data and log key pairs for what is written from now on
    /// (ids and chunk keys stay, so deduplication goes on). Members must be issued again.
    pub fn rotate(&mut self) {
        self.generation += 1;
        self.rotations
            .insert(self.generation, coffer_proto::now_us());
    }
}

/// What one member holds. Absent keys are the ones its role must not have.
pub struct Member {
    pub keyring_id: [u8; 16],
    pub member: String,
    pub role: Role,
    pub generation: u32,
    id_key: Option<Key>,
    conv_key: Option<Key>,
    path_key: Option<Key>,
    data_public: Key,
    /// By generation.
    data_secret: BTreeMap<u32, Key>,
    log_public: Key,
    log_secret: BTreeMap<u32, Key>,
    signing: Option<Key>,
    cert: v1::MemberCert,
    master_public: Key,
    /// When each generation after the first started (Unix µs): a header sealed under an older
    /// generation but committed after the next one started is refused.
    rotations: BTreeMap<u32, i64>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Member({} {})", self.member, self.role.name())
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        for k in [
            &mut self.id_key,
            &mut self.conv_key,
            &mut self.path_key,
            &mut self.signing,
        ]
        .into_iter()
        .flatten()
        {
            k.zeroize();
        }
        for k in self
            .data_secret
            .values_mut()
            .chain(self.log_secret.values_mut())
        {
            k.zeroize();
        }
    }
}

/// The member file as stored (JSON, mode 0600, like the account password beside it).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberFile {
    format: u32,
    kind: String,
    keyring_id: String,
    member: String,
    role: Role,
    generation: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conv_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_key: Option<String>,
    data_public: String,
    #[serde(default)]
    data_secret: BTreeMap<u32, String>,
    log_public: String,
    #[serde(default)]
    log_secret: BTreeMap<u32, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signing_secret: Option<String>,
    cert_body: String,
    cert_signature: String,
    master_public: String,
    #[serde(default)]
    rotations: BTreeMap<u32, i64>,
}

impl Member {
    /// The member file's text.
    ///
    /// # Errors
    /// Never in practice (serialisation of plain data).
    pub fn to_file(&self) -> Result<String, ClientError> {
        let h = |k: &Option<Key>| k.as_ref().map(hex::encode);
        let f = MemberFile {
            format: 1,
            kind: MEMBER_KIND.into(),
            keyring_id: hex::encode(self.keyring_id),
            member: self.member.clone(),
            role: self.role,
            generation: self.generation,
            id_key: h(&self.id_key),
            conv_key: h(&self.conv_key),
            path_key: h(&self.path_key),
            data_public: hex::encode(self.data_public),
            data_secret: self
                .data_secret
                .iter()
                .map(|(g, k)| (*g, hex::encode(k)))
                .collect(),
            log_public: hex::encode(self.log_public),
            log_secret: self
                .log_secret
                .iter()
                .map(|(g, k)| (*g, hex::encode(k)))
                .collect(),
            signing_secret: h(&self.signing),
            cert_body: hex::encode(&self.cert.body),
            cert_signature: hex::encode(&self.cert.signature),
            master_public: hex::encode(self.master_public),
            rotations: self.rotations.clone(),
        };
        serde_json::to_string_pretty(&f).map_err(|e| keyring(e.to_string()))
    }

    /// Reads a member file and checks its certificate against its master key.
    ///
    /// # Errors
    /// Not a member file; a certificate that does not verify or names another member.
    pub fn from_file(text: &str) -> Result<Self, ClientError> {
        let f: MemberFile = serde_json::from_str(text)
            .map_err(|e| keyring(format!("not a coffer keyring member file: {e}")))?;
        if f.kind != MEMBER_KIND || f.format != 1 {
            return Err(keyring(format!(
                "not a coffer keyring member file (kind {:?}, format {})",
                f.kind, f.format
            )));
        }
        let opt = |k: &Option<String>, w| k.as_deref().map(|k| hex32(k, w)).transpose();
        let map = |m: &BTreeMap<u32, String>, w| {
            m.iter()
                .map(|(g, k)| Ok((*g, hex32(k, w)?)))
                .collect::<Result<BTreeMap<_, _>, ClientError>>()
        };
        let mut id = [0u8; 16];
        hex::decode_to_slice(&f.keyring_id, &mut id)
            .map_err(|_| keyring("the member file's keyring id is not 32 hex digits"))?;
        let m = Self {
            keyring_id: id,
            member: f.member.clone(),
            role: f.role,
            generation: f.generation,
            id_key: opt(&f.id_key, "id_key")?,
            conv_key: opt(&f.conv_key, "conv_key")?,
            path_key: opt(&f.path_key, "path_key")?,
            data_public: hex32(&f.data_public, "data_public")?,
            data_secret: map(&f.data_secret, "data_secret")?,
            log_public: hex32(&f.log_public, "log_public")?,
            log_secret: map(&f.log_secret, "log_secret")?,
            signing: opt(&f.signing_secret, "signing_secret")?,
            cert: v1::MemberCert {
                body: hex::decode(&f.cert_body)
                    .map_err(|_| keyring("bad cert_body"))?
                    .into(),
                signature: hex::decode(&f.cert_signature)
                    .map_err(|_| keyring("bad cert_signature"))?
                    .into(),
            },
            master_public: hex32(&f.master_public, "master_public")?,
            rotations: f.rotations.clone(),
        };
        let body = m.verify_cert(&m.cert)?;
        if body.member != m.member || body.role != m.role.name() {
            return Err(keyring(format!(
                "the member file says {} ({}) but its certificate says {} ({})",
                m.member,
                m.role.name(),
                body.member,
                body.role
            )));
        }
        Ok(m)
    }

    /// Reads the member file at `path`.
    ///
    /// # Errors
    /// As [`Member::from_file`], and I/O errors.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClientError::io("read", path, e))?;
        Self::from_file(&text).map_err(|e| keyring(format!("{}: {e}", path.display())))
    }

    /// Checks a certificate against this keyring's master key; answers what it certifies.
    ///
    /// # Errors
    /// A certificate of another keyring, or one the master did not sign.
    pub fn verify_cert(&self, cert: &v1::MemberCert) -> Result<v1::MemberCertBody, ClientError> {
        let master = ed25519_dalek::VerifyingKey::from_bytes(&self.master_public)
            .map_err(|_| keyring("the keyring's master public key is not a valid Ed25519 key"))?;
        let sig = ed25519_dalek::Signature::from_slice(&cert.signature)
            .map_err(|_| keyring("a member certificate's signature is malformed"))?;
        master
            .verify(&cert.body, &sig)
            .map_err(|_| keyring("a member certificate is not signed by this keyring's master"))?;
        let body = v1::MemberCertBody::decode(&cert.body[..])
            .map_err(|e| keyring(format!("a member certificate does not decode: {e}")))?;
        if body.keyring_id[..] != self.keyring_id[..] {
            return Err(keyring("a member certificate belongs to another keyring"));
        }
        Ok(body)
    }

    /// The key chunk ids are keyed under (writers only).
    ///
    /// # Errors
    /// A log-only member.
    pub fn id_key(&self) -> Result<DedupKey, ClientError> {
        self.id_key
            .map(DedupKey::from_bytes)
            .ok_or_else(|| self.lacks("back up (it has no chunk id key)"))
    }

    fn lacks(&self, what: &str) -> ClientError {
        keyring(format!(
            "keyring member {} is {}: it cannot {what}",
            self.member,
            self.role.name()
        ))
    }

    /// Whether this member can open snapshot headers (list).
    #[must_use]
    pub fn can_list(&self) -> bool {
        !self.log_secret.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const FAST: Kdf = Kdf {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    };

    #[test]
    fn master_file_round_trip_and_wrong_passphrase() {
        let m = Master::generate();
        let text = m.to_file("pass phrase", FAST).unwrap();
        let back = Master::from_file(&text, "pass phrase").unwrap();
        assert_eq!(back.keyring_id, m.keyring_id);
        assert_eq!(back.public(), m.public());
        let e = Master::from_file(&text, "wrong").unwrap_err().to_string();
        assert!(e.contains("wrong passphrase"), "{e}");
    }

    #[test]
    fn members_hold_what_their_role_needs_and_nothing_else() {
        let m = Master::generate();
        let rw = Member::from_file(&m.issue("a@h", Role::ReadWrite).to_file().unwrap()).unwrap();
        assert!(rw.id_key().is_ok() && rw.can_list() && !rw.data_secret.is_empty());
        let wo = Member::from_file(&m.issue("w@h", Role::WriteOnly).to_file().unwrap()).unwrap();
        assert!(wo.id_key().is_ok() && !wo.can_list() && wo.data_secret.is_empty());
        assert_eq!(wo.id_key().unwrap(), rw.id_key().unwrap());
        let text = m.issue("l@h", Role::LogOnly).to_file().unwrap();
        assert!(!text.contains("id_key") && !text.contains("signing_secret"));
        let lo = Member::from_file(&text).unwrap();
        assert!(lo.can_list() && lo.id_key().is_err() && lo.data_secret.is_empty());
        // A member file whose role was edited no longer matches its certificate.
        let forged = m
            .issue("w@h", Role::WriteOnly)
            .to_file()
            .unwrap()
            .replace("\"write-only\"", "\"read-write\"");
        assert!(Member::from_file(&forged).is_err());
        // Another keyring's certificate is refused.
        let other = Master::generate().issue("x@h", Role::ReadWrite);
        assert!(rw.verify_cert(&other.cert).is_err());
    }
}
