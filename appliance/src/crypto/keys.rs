//! Key material of a managed repository.
//!
//! * A random 32-byte **master key** is created at `init` and stored only wrapped:
//!   `keys/master.key` holds AES-256-GCM(KEK, master key) where the KEK is argon2id of the
//!   repository password (parameters and salt stored beside it).
//! * Sub-keys are derived with BLAKE3's key-derivation mode, never stored:
//!   * dedup key = `derive_key("coffer v1 dedup key", master)` — given to clients, keys chunk ids;
//!   * pack key  = `derive_key("coffer v1 pack key", master || pack_id)` — one AES-256-GCM key per
//!     pack, so nonces (the record's sequence number in its pack) never repeat under one key.

use std::path::Path;

use coffer_proto::{DedupKey, PackId};
use ring::aead;
use zeroize::Zeroizing;

use crate::error::RepoError;
use crate::repo::le_u32;

pub const KEY_MAGIC: &[u8; 8] = b"COFFKEY\0";
pub const KEY_FORMAT_VERSION: u32 = 1;
pub const KEY_FILE_LEN: usize = 104;
const KDF_ARGON2ID: u8 = 1;

/// argon2id parameters for the repository password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl KdfParams {
    /// 64 MiB, 3 passes, 1 lane.
    pub const DEFAULT: Self = Self {
        m_cost_kib: 64 * 1024,
        t_cost: 3,
        p_cost: 1,
    };
}

/// The unwrapped master key and its derived sub-keys.
pub struct MasterKey {
    master: Zeroizing<[u8; 32]>,
    dedup: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    fn from_bytes(master: [u8; 32]) -> Self {
        let dedup = blake3::derive_key("coffer v1 dedup key", &master);
        Self {
            master: Zeroizing::new(master),
            dedup: Zeroizing::new(dedup),
        }
    }

    /// A fresh random master key.
    #[must_use]
    pub fn generate() -> Self {
        Self::from_bytes(rand::random())
    }

    /// The key that chunk ids are keyed BLAKE3 hashes under.
    #[must_use]
    pub fn dedup_key(&self) -> DedupKey {
        DedupKey::from_bytes(*self.dedup)
    }

    /// The AES-256-GCM key of one pack.
    #[must_use]
    pub fn pack_key(&self, pack: &PackId) -> PackKey {
        let mut material = Zeroizing::new([0u8; 48]);
        material[..32].copy_from_slice(&*self.master);
        material[32..].copy_from_slice(pack.as_bytes());
        let k = Zeroizing::new(blake3::derive_key("coffer v1 pack key", &*material));
        PackKey::new(&k)
    }

    /// Wraps the master key under `password` into the key-file layout.
    ///
    /// # Errors
    /// When argon2 rejects the parameters.
    pub fn wrap(&self, password: &[u8], params: KdfParams) -> Result<Vec<u8>, RepoError> {
        let salt: [u8; 16] = rand::random();
        let nonce: [u8; 12] = rand::random();
        let mut out = vec![0u8; KEY_FILE_LEN];
        out[..8].copy_from_slice(KEY_MAGIC);
        out[8..12].copy_from_slice(&KEY_FORMAT_VERSION.to_le_bytes());
        out[12] = KDF_ARGON2ID;
        out[16..20].copy_from_slice(&params.m_cost_kib.to_le_bytes());
        out[20..24].copy_from_slice(&params.t_cost.to_le_bytes());
        out[24..28].copy_from_slice(&params.p_cost.to_le_bytes());
        out[28..44].copy_from_slice(&salt);
        out[44..56].copy_from_slice(&nonce);
        let kek = derive_kek(password, &salt, params)?;
        let (head, tail) = out.split_at_mut(56);
        tail[..32].copy_from_slice(&*self.master);
        let tag = kek
            .0
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&head[..]),
                &mut tail[..32],
            )
            .map_err(|_| RepoError::Invalid("key wrapping failed".into()))?;
        tail[32..48].copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Unwraps a key file with `password`.
    ///
    /// # Errors
    /// [`RepoError::WrongPassword`] when the password does not open it; [`RepoError::Invalid`]
    /// when the file is damaged.
    pub fn unwrap(file: &[u8], password: &[u8]) -> Result<Self, RepoError> {
        if file.len() != KEY_FILE_LEN || &file[..8] != KEY_MAGIC {
            return Err(RepoError::Invalid(
                "keys/master.key is not a coffer key file".into(),
            ));
        }
        let version = le_u32(file, 8);
        if version > KEY_FORMAT_VERSION || file[12] != KDF_ARGON2ID {
            return Err(RepoError::Invalid(format!(
                "key file version {version} / kdf {} is not supported by this build",
                file[12]
            )));
        }
        let params = KdfParams {
            m_cost_kib: le_u32(file, 16),
            t_cost: le_u32(file, 20),
            p_cost: le_u32(file, 24),
        };
        let kek = derive_kek(password, &file[28..44], params)?;
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&file[44..56]);
        let mut body = Zeroizing::new([0u8; 48]);
        body.copy_from_slice(&file[56..104]);
        let plain = kek
            .0
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&file[..56]),
                &mut body[..],
            )
            .map_err(|_| RepoError::WrongPassword)?;
        let mut master = [0u8; 32];
        master.copy_from_slice(plain);
        Ok(Self::from_bytes(master))
    }

    /// Reads and unwraps `path`.
    ///
    /// # Errors
    /// As [`MasterKey::unwrap`], plus I/O errors.
    pub fn load(path: &Path, password: &[u8]) -> Result<Self, RepoError> {
        let bytes = std::fs::read(path)
            .map_err(|e| RepoError::Io(format!("reading {}", path.display()), e))?;
        Self::unwrap(&bytes, password)
    }
}

fn derive_kek(password: &[u8], salt: &[u8], p: KdfParams) -> Result<PackKey, RepoError> {
    let params = argon2::Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(32))
        .map_err(|e| RepoError::Invalid(format!("argon2 parameters: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = Zeroizing::new([0u8; 32]);
    a.hash_password_into(password, salt, &mut *kek)
        .map_err(|e| RepoError::Invalid(format!("argon2: {e}")))?;
    Ok(PackKey::new(&kek))
}

/// One AES-256-GCM key (ring, AES-NI + CLMUL/VAES where the CPU has them).
pub struct PackKey(aead::LessSafeKey);

impl std::fmt::Debug for PackKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PackKey(..)")
    }
}

/// AEAD tag length.
pub const TAG_LEN: usize = 16;

impl PackKey {
    fn new(key: &[u8; 32]) -> Self {
        let unbound =
            aead::UnboundKey::new(&aead::AES_256_GCM, key).expect("a 32-byte key is valid");
        Self(aead::LessSafeKey::new(unbound))
    }

    /// Encrypts `in_out` in place and returns the tag.
    #[must_use]
    pub fn seal(&self, nonce: [u8; 12], aad: &[u8], in_out: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .0
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                in_out,
            )
            .expect("AES-GCM sealing fails only past 64 GiB per message");
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        t
    }

    /// Decrypts `ciphertext || tag` in place; returns the plaintext length, or `None` when the tag
    /// does not verify.
    #[must_use]
    pub fn open(&self, nonce: [u8; 12], aad: &[u8], in_out: &mut [u8]) -> Option<usize> {
        self.0
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                in_out,
            )
            .ok()
            .map(|p| p.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    };

    #[test]
    fn wrap_unwrap_and_wrong_password() {
        let k = MasterKey::generate();
        let file = k.wrap(b"pw", FAST).unwrap();
        let k2 = MasterKey::unwrap(&file, b"pw").unwrap();
        assert_eq!(k.dedup_key(), k2.dedup_key());
        assert!(matches!(
            MasterKey::unwrap(&file, b"nope"),
            Err(RepoError::WrongPassword)
        ));
        let mut bad = file.clone();
        bad[30] ^= 1; // salt is authenticated through the KEK
        assert!(MasterKey::unwrap(&bad, b"pw").is_err());
    }

    #[test]
    fn pack_keys_differ_per_pack_and_round_trip() {
        let k = MasterKey::generate();
        let a = k.pack_key(&PackId::from_bytes([1; 16]));
        let b = k.pack_key(&PackId::from_bytes([2; 16]));
        let mut buf = b"hello world".to_vec();
        let tag = a.seal([0; 12], b"aad", &mut buf);
        let mut ct = buf.clone();
        ct.extend_from_slice(&tag);
        let mut ct2 = ct.clone();
        assert_eq!(a.open([0; 12], b"aad", &mut ct), Some(11));
        assert_eq!(&ct[..11], b"hello world");
        assert_eq!(b.open([0; 12], b"aad", &mut ct2), None);
    }
}
