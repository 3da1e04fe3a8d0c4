//! Typed identifiers: a pack id can never be passed where a chunk id is expected.

use std::fmt;

/// Why bytes could not be read as an id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("an id must be {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    #[error("an id must be {expected} hex digits: {0}", expected = .1 * 2)]
    Hex(String, usize),
}

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name([u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// Wraps raw bytes.
            #[must_use]
            pub const fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }

            /// Reads an id from a slice of exactly `LEN` bytes.
            ///
            /// # Errors
            /// When the slice has another length.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
                let arr: [u8; $len] = bytes
                    .try_into()
                    .map_err(|_| IdError::Length { expected: $len, got: bytes.len() })?;
                Ok(Self(arr))
            }

            /// Parses lower- or upper-case hex.
            ///
            /// # Errors
            /// When the text is not exactly `2 * LEN` hex digits.
            pub fn from_hex(text: &str) -> Result<Self, IdError> {
                let mut out = [0u8; $len];
                hex::decode_to_slice(text, &mut out)
                    .map_err(|_| IdError::Hex(text.to_string(), $len))?;
                Ok(Self(out))
            }

            /// The raw bytes.
            #[must_use]
            pub const fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Lower-case hex.
            #[must_use]
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
    };
}

byte_id!(
    /// Keyed BLAKE3 of a chunk's plaintext under the repository's dedup key.
    ChunkId,
    32
);
byte_id!(
    /// Random id of a pack file.
    PackId,
    16
);
byte_id!(
    /// Random id of a committed snapshot.
    SnapshotId,
    16
);

byte_id!(
    /// Random id of a repository, recorded in its `coffer.repo` and in every pack header.
    RepositoryId,
    16
);

/// The repository's 32-byte key for chunk ids (keyed BLAKE3 of the plaintext). A secret of the
/// repository: never printed, not even by `Debug`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DedupKey([u8; 32]);

impl DedupKey {
    /// Wraps raw key bytes.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Reads a key from a slice of exactly 32 bytes.
    ///
    /// # Errors
    /// [`IdError::Length`] otherwise.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        <[u8; 32]>::try_from(bytes)
            .map(Self)
            .map_err(|_| IdError::Length {
                expected: 32,
                got: bytes.len(),
            })
    }

    /// The raw key bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DedupKey(..)")
    }
}

impl ChunkId {
    /// The routing key used by the stable sharding function `le64-mod`: the first eight bytes,
    /// little-endian.
    #[must_use]
    pub fn routing_key(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }
}

/// Index of a shard (one RocksDB instance, one pack writer, one core).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ShardId(pub u16);

impl ShardId {
    /// The stable sharding function `le64-mod` recorded in every repository file:
    /// `shard = le_u64(id[0..8]) mod shard_count`.
    ///
    /// # Panics
    /// When `shard_count` is zero (a repository file never holds zero; it is checked on load).
    #[must_use]
    pub fn for_chunk(id: &ChunkId, shard_count: u16) -> Self {
        assert!(
            shard_count > 0,
            "shard_count is validated when the repository is opened"
        );
        // The remainder is < shard_count <= u16::MAX.
        #[allow(clippy::cast_possible_truncation)]
        Self((id.routing_key() % u64::from(shard_count)) as u16)
    }

    /// As a `usize` index.
    #[must_use]
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard-{}", self.0)
    }
}

/// The chunk id of `plaintext`: keyed BLAKE3 under the repository's dedup key.
#[must_use]
pub fn chunk_id(dedup_key: &DedupKey, plaintext: &[u8]) -> ChunkId {
    ChunkId(*blake3::keyed_hash(&dedup_key.0, plaintext).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let id = ChunkId::from_bytes([7u8; 32]);
        assert_eq!(ChunkId::from_hex(&id.to_hex()).unwrap(), id);
        assert!(ChunkId::from_hex("zz").is_err());
        assert_eq!(
            PackId::from_slice(&[1, 2, 3]),
            Err(IdError::Length {
                expected: 16,
                got: 3
            })
        );
    }

    #[test]
    fn sharding_is_stable_and_uses_le64() {
        let mut b = [0u8; 32];
        b[0] = 5;
        let id = ChunkId::from_bytes(b);
        assert_eq!(ShardId::for_chunk(&id, 2), ShardId(1));
        assert_eq!(ShardId::for_chunk(&id, 3), ShardId(2));
        assert_eq!(ShardId::for_chunk(&id, 1), ShardId(0));
    }

    #[test]
    fn chunk_id_depends_on_key_and_data() {
        let (one, two) = (DedupKey::from_bytes([1; 32]), DedupKey::from_bytes([2; 32]));
        let a = chunk_id(&one, b"hello");
        assert_ne!(a, chunk_id(&two, b"hello"));
        assert_ne!(a, chunk_id(&one, b"hellp"));
        assert_eq!(a, chunk_id(&one, b"hello"));
        assert_eq!(
            format!("{one:?}"),
            "DedupKey(..)",
            "the key is never printed"
        );
    }
}
