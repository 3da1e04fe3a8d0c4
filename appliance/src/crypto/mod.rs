//! Keys and encryption.
//!
//! Owns: the repository's master key and its wrapped key file ([`keys`]), per-pack keys, and the
//! [`Encryption`] seam through which the pack writer seals records and every reader opens them.
//! The managed mode (the appliance holds the keys: [`keys::MasterKey`]) is its first
//! implementation; the sealed mode (the client encrypted, the appliance holds opaque payloads)
//! plugs in behind the same trait.
//!
//! Must never touch files other than the key file, nor the network, nor the index.

pub mod keys;

use coffer_proto::PackId;

pub use keys::TAG_LEN;

/// How the records of packs are protected.
pub trait Encryption: Send + Sync + std::fmt::Debug {
    /// The cipher of one pack's records (called once per pack, not per record).
    fn pack_cipher(&self, pack: &PackId) -> Box<dyn RecordCipher>;
}

/// Seals and opens the records of one pack. The nonce is unique per record of the pack; the
/// additional data is the record header's authenticated part.
pub trait RecordCipher: Send + std::fmt::Debug {
    /// Encrypts `payload` in place; answers the [`TAG_LEN`]-byte tag stored after it.
    fn seal(&self, nonce: [u8; 12], aad: &[u8], payload: &mut [u8]) -> [u8; TAG_LEN];
    /// Opens `payload || tag` in place; answers the payload's length, or `None` when the tag
    /// does not verify (corruption, or another pack's key).
    fn open(&self, nonce: [u8; 12], aad: &[u8], sealed: &mut [u8]) -> Option<usize>;
}

/// The managed mode: AES-256-GCM under a key derived per pack from the master key.
impl Encryption for keys::MasterKey {
    fn pack_cipher(&self, pack: &PackId) -> Box<dyn RecordCipher> {
        Box::new(self.pack_key(pack))
    }
}

impl RecordCipher for keys::PackKey {
    fn seal(&self, nonce: [u8; 12], aad: &[u8], payload: &mut [u8]) -> [u8; TAG_LEN] {
        keys::PackKey::seal(self, nonce, aad, payload)
    }

    fn open(&self, nonce: [u8; 12], aad: &[u8], sealed: &mut [u8]) -> Option<usize> {
        keys::PackKey::open(self, nonce, aad, sealed)
    }
}
