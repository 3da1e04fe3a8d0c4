//! Byte layout of pack files and index entries (version 1). Pure functions on byte slices, used
//! by the writer, the read path, `verify` and `rebuild-index`. Every decode of untrusted bytes
//! returns an error instead of panicking. Specified in `docs/format.md`.
//!
//! ```text
//! pack   = header(64) record* [footer trailer(32)]      (footer + trailer only once sealed)
//! record = record_header(64) payload(stored_len)        payload = AES-256-GCM ciphertext || tag
//! ```

use coffer_proto::v1::Compression;
use coffer_proto::{ChunkId, PackId, RepositoryId, ShardId};

use crate::repo::{le_u32, le_u64};

pub const PACK_MAGIC: &[u8; 8] = b"COFFPACK";
pub const PACK_FORMAT_VERSION: u32 = 1;
pub const PACK_HEADER_LEN: usize = 64;
pub const RECORD_MAGIC: &[u8; 4] = b"CREC";
pub const RECORD_HEADER_LEN: usize = 64;
/// The part of a record header that is authenticated as AEAD associated data.
pub const RECORD_AAD_LEN: usize = 48;
pub const FOOTER_MAGIC: &[u8; 8] = b"COFFFOOT";
pub const FOOTER_HEAD_LEN: usize = 16;
pub const FOOTER_ENTRY_LEN: usize = 48;
pub const TRAILER_MAGIC: &[u8; 8] = b"COFFEND\0";
pub const TRAILER_LEN: usize = 32;
pub const INDEX_ENTRY_VERSION: u8 = 1;
pub const INDEX_ENTRY_LEN: usize = 34;

/// Record flag: the payload plaintext is a zstd frame.
pub const FLAG_ZSTD: u8 = 0b0000_0001;
/// Record flag (reserved for sealed mode): the payload was encrypted by the client and is opaque
/// to the appliance; the id is then keyed within a keyring, not by the repository dedup key.
pub const FLAG_SEALED: u8 = 0b0000_0010;
/// Record flag: the payload plaintext is an LZ4 block (never together with [`FLAG_ZSTD`]).
pub const FLAG_LZ4: u8 = 0b0000_0100;

/// The compression of a record's stored plaintext. Unknown flag bits, or zstd and LZ4 together,
/// make the record unreadable rather than misread.
///
/// # Errors
/// [`FormatError::Corrupt`] for flags this build does not understand.
pub fn compression_of(flags: u8) -> Result<Compression, FormatError> {
    match flags & !FLAG_SEALED {
        0 => Ok(Compression::None),
        FLAG_ZSTD => Ok(Compression::Zstd),
        FLAG_LZ4 => Ok(Compression::Lz4),
        _ => Err(corrupt(format!("record flags {flags:#04x} not understood"))),
    }
}

/// The record flags of a stored plaintext in `compression` (`None`, `Zstd` or `Lz4`).
#[must_use]
pub fn flags_of(compression: Compression) -> u8 {
    match compression {
        Compression::Zstd => FLAG_ZSTD,
        Compression::Lz4 => FLAG_LZ4,
        Compression::None | Compression::Proof => 0,
    }
}

/// A pack whose bytes do not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum FormatError {
    #[error("{0}")]
    Corrupt(String),
    #[error("pack format version {0} is newer than this build understands")]
    Version(u32),
}

fn corrupt(s: impl Into<String>) -> FormatError {
    FormatError::Corrupt(s.into())
}

/// The fixed header at offset 0 of every pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackHeader {
    pub pack: PackId,
    pub shard: ShardId,
    pub repo_id: RepositoryId,
    pub created_us: i64,
}

impl PackHeader {
    #[must_use]
    pub fn encode(&self) -> [u8; PACK_HEADER_LEN] {
        let mut b = [0u8; PACK_HEADER_LEN];
        b[0..8].copy_from_slice(PACK_MAGIC);
        b[8..12].copy_from_slice(&PACK_FORMAT_VERSION.to_le_bytes());
        b[12..14].copy_from_slice(&self.shard.0.to_le_bytes());
        b[16..32].copy_from_slice(self.pack.as_bytes());
        b[32..48].copy_from_slice(self.repo_id.as_bytes());
        b[48..56].copy_from_slice(&self.created_us.to_le_bytes());
        let crc = crc32fast::hash(&b[..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// # Errors
    /// [`FormatError`] when the bytes are not a valid header.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < PACK_HEADER_LEN || &b[0..8] != PACK_MAGIC {
            return Err(corrupt("not a pack file (bad magic)"));
        }
        let v = le_u32(b, 8);
        if v > PACK_FORMAT_VERSION {
            return Err(FormatError::Version(v));
        }
        if crc32fast::hash(&b[..56]) != le_u32(b, 56) {
            return Err(corrupt("pack header checksum mismatch"));
        }
        Ok(Self {
            pack: PackId::from_slice(&b[16..32]).map_err(|e| corrupt(e.to_string()))?,
            shard: ShardId(u16::from_le_bytes([b[12], b[13]])),
            repo_id: RepositoryId::from_slice(&b[32..48]).map_err(|e| corrupt(e.to_string()))?,
            created_us: le_u64(b, 48).cast_signed(),
        })
    }
}

/// The header in front of each record's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub flags: u8,
    pub id: ChunkId,
    /// Plaintext length of the chunk.
    pub raw_len: u32,
    /// Payload length on disk, ciphertext plus tag.
    pub stored_len: u32,
    pub nonce: [u8; 12],
}

impl RecordHeader {
    #[must_use]
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(RECORD_MAGIC);
        b[4] = self.flags;
        b[8..40].copy_from_slice(self.id.as_bytes());
        b[40..44].copy_from_slice(&self.raw_len.to_le_bytes());
        b[44..48].copy_from_slice(&self.stored_len.to_le_bytes());
        b[48..60].copy_from_slice(&self.nonce);
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// # Errors
    /// [`FormatError`] when the bytes are not a valid record header.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < RECORD_HEADER_LEN || &b[0..4] != RECORD_MAGIC {
            return Err(corrupt("bad record magic"));
        }
        if crc32fast::hash(&b[..60]) != le_u32(b, 60) {
            return Err(corrupt("record header checksum mismatch"));
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&b[48..60]);
        compression_of(b[4])?;
        Ok(Self {
            flags: b[4],
            id: ChunkId::from_slice(&b[8..40]).map_err(|e| corrupt(e.to_string()))?,
            raw_len: le_u32(b, 40),
            stored_len: le_u32(b, 44),
            nonce,
        })
    }

    /// Header plus payload.
    #[must_use]
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

/// Nonce of the `seq`-th record of a pack: `seq` as little-endian u64, then four zero bytes. Each
/// pack has its own key, so a (key, nonce) pair is never used twice.
#[must_use]
pub fn record_nonce(seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&seq.to_le_bytes());
    n
}

/// Where a chunk lives; the value stored in the index under its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub flags: u8,
    pub pack: PackId,
    /// Offset of the record header in the pack.
    pub offset: u64,
    /// Record length (header + payload).
    pub len: u32,
    pub raw_len: u32,
    /// Sealed records: [`envelope_digest`] of the stored envelope, so that an upload of a
    /// different envelope under the same id (a poisoned record, or the honest one replacing it)
    /// is seen without reading the record. `None` for managed records and for entries rebuilt
    /// from footers.
    pub digest: Option<[u8; ENVELOPE_DIGEST_LEN]>,
    /// Sealed records: the ownership key of the account whose upload wrote it. An account never
    /// replaces a record it wrote itself (a compromised client cannot destroy what it stored);
    /// `None` when unknown (all zero on disk).
    pub uploader: Option<[u8; 16]>,
}

/// Bytes of an envelope digest kept in the index: 128 bits. To pass garbage off as a stored
/// envelope (or the reverse) an uploader would need a second preimage of BLAKE3 truncated to
/// 128 bits; the honest envelope is fixed by its plaintext and keyring, so a birthday search has
/// nothing to vary on one side. Half the index bytes of a full hash, on every sealed chunk.
pub const ENVELOPE_DIGEST_LEN: usize = 16;
/// See [`ENVELOPE_DIGEST_LEN`].
pub type EnvelopeDigest = [u8; ENVELOPE_DIGEST_LEN];

/// The digest of a sealed envelope as the index keeps it: the first 16 bytes of its BLAKE3
/// (what `FindMissingRequest.envelope_hashes` declares in full).
#[must_use]
pub fn envelope_digest(envelope: &[u8]) -> [u8; ENVELOPE_DIGEST_LEN] {
    let h = blake3::hash(envelope);
    h.as_bytes()[..ENVELOPE_DIGEST_LEN]
        .try_into()
        .expect("16 of 32 bytes")
}

/// Bytes of the sealed tail of an index entry: digest and uploader.
pub const SEALED_TAIL_LEN: usize = ENVELOPE_DIGEST_LEN + 16;

impl IndexEntry {
    /// 34 bytes, or 66 with the envelope digest and uploader of a sealed record.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; INDEX_ENTRY_LEN];
        b[0] = INDEX_ENTRY_VERSION;
        b[1] = self.flags;
        b[2..18].copy_from_slice(self.pack.as_bytes());
        b[18..26].copy_from_slice(&self.offset.to_le_bytes());
        b[26..30].copy_from_slice(&self.len.to_le_bytes());
        b[30..34].copy_from_slice(&self.raw_len.to_le_bytes());
        if let Some(d) = &self.digest {
            b.extend_from_slice(d);
            b.extend_from_slice(&self.uploader.unwrap_or_default());
        }
        b
    }

    /// # Errors
    /// [`FormatError`] for an unknown version or short value.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < INDEX_ENTRY_LEN {
            return Err(corrupt(format!("index entry of {} bytes", b.len())));
        }
        if b[0] != INDEX_ENTRY_VERSION {
            return Err(corrupt(format!("index entry version {}", b[0])));
        }
        Ok(Self {
            flags: b[1],
            pack: PackId::from_slice(&b[2..18]).map_err(|e| corrupt(e.to_string()))?,
            offset: le_u64(b, 18),
            len: le_u32(b, 26),
            raw_len: le_u32(b, 30),
            digest: b
                .get(INDEX_ENTRY_LEN..INDEX_ENTRY_LEN + ENVELOPE_DIGEST_LEN)
                .map(|d| d.try_into().expect("16 bytes")),
            uploader: b
                .get(INDEX_ENTRY_LEN + ENVELOPE_DIGEST_LEN..INDEX_ENTRY_LEN + SEALED_TAIL_LEN)
                .filter(|u| u.iter().any(|&x| x != 0))
                .map(|u| u.try_into().expect("16 bytes")),
        })
    }
}

/// One line of a sealed pack's footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FooterEntry {
    pub id: ChunkId,
    pub offset: u64,
    pub len: u32,
    pub raw_len: u32,
}

/// Length of the footer plus trailer for `n` records.
#[must_use]
pub fn footer_len(n: usize) -> usize {
    FOOTER_HEAD_LEN + n * FOOTER_ENTRY_LEN + TRAILER_LEN
}

/// Encodes the footer and trailer for a pack whose footer starts at `footer_offset`.
#[must_use]
pub fn encode_footer(entries: &[FooterEntry], footer_offset: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(footer_len(entries.len()));
    b.extend_from_slice(FOOTER_MAGIC);
    b.extend_from_slice(
        &u32::try_from(entries.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    b.extend_from_slice(&0u32.to_le_bytes());
    for e in entries {
        b.extend_from_slice(e.id.as_bytes());
        b.extend_from_slice(&e.offset.to_le_bytes());
        b.extend_from_slice(&e.len.to_le_bytes());
        b.extend_from_slice(&e.raw_len.to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    let body_len = b.len() as u64;
    b.extend_from_slice(&footer_offset.to_le_bytes());
    b.extend_from_slice(&body_len.to_le_bytes());
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(TRAILER_MAGIC);
    b
}

/// The trailer at the end of a sealed pack: where the footer starts and how long it is.
///
/// # Errors
/// [`FormatError`] when `tail` (the last 32 bytes of the file) is not a trailer; an unsealed pack
/// has none.
pub fn decode_trailer(tail: &[u8], file_len: u64) -> Result<(u64, u64, u32), FormatError> {
    if tail.len() != TRAILER_LEN || &tail[24..32] != TRAILER_MAGIC {
        return Err(corrupt(
            "no pack trailer (the pack was never sealed, or is truncated)",
        ));
    }
    let off = le_u64(tail, 0);
    let len = le_u64(tail, 8);
    let crc = le_u32(tail, 16);
    let end = off
        .checked_add(len)
        .ok_or_else(|| corrupt("footer range overflows"))?;
    if off < PACK_HEADER_LEN as u64 || end + TRAILER_LEN as u64 != file_len {
        return Err(corrupt("footer range does not match the file length"));
    }
    Ok((off, len, crc))
}

/// Parses footer bytes (without trailer) and checks them against the CRC from the trailer and the
/// footer's own position.
///
/// # Errors
/// [`FormatError`] on any inconsistency.
pub fn decode_footer(
    b: &[u8],
    crc: u32,
    footer_offset: u64,
) -> Result<Vec<FooterEntry>, FormatError> {
    if b.len() < FOOTER_HEAD_LEN || &b[0..8] != FOOTER_MAGIC {
        return Err(corrupt("bad footer magic"));
    }
    if crc32fast::hash(b) != crc {
        return Err(corrupt("footer checksum mismatch"));
    }
    let n = le_u32(b, 8) as usize;
    if b.len() != FOOTER_HEAD_LEN + n * FOOTER_ENTRY_LEN {
        return Err(corrupt("footer length does not match its entry count"));
    }
    let mut out = Vec::with_capacity(n);
    for e in b[FOOTER_HEAD_LEN..].chunks_exact(FOOTER_ENTRY_LEN) {
        let entry = FooterEntry {
            id: ChunkId::from_slice(&e[0..32]).map_err(|x| corrupt(x.to_string()))?,
            offset: le_u64(e, 32),
            len: le_u32(e, 40),
            raw_len: le_u32(e, 44),
        };
        if entry.offset < PACK_HEADER_LEN as u64
            || entry.offset + u64::from(entry.len) > footer_offset
        {
            return Err(corrupt(format!(
                "footer entry for {} points outside the records",
                entry.id
            )));
        }
        out.push(entry);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_header_round_trip_and_crc() {
        let h = RecordHeader {
            flags: FLAG_ZSTD,
            id: ChunkId::from_bytes([3; 32]),
            raw_len: 1000,
            stored_len: 500,
            nonce: record_nonce(7),
        };
        let b = h.encode();
        assert_eq!(RecordHeader::decode(&b).unwrap(), h);
        for i in 0..RECORD_HEADER_LEN {
            let mut d = b;
            d[i] ^= 0x40;
            assert!(RecordHeader::decode(&d).is_err(), "flip at {i} undetected");
        }
    }

    #[test]
    fn record_flags_name_one_compression_or_the_record_is_refused() {
        for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
            assert_eq!(compression_of(flags_of(c)).unwrap(), c);
        }
        let h = RecordHeader {
            flags: FLAG_LZ4,
            id: ChunkId::from_bytes([3; 32]),
            raw_len: 1000,
            stored_len: 500,
            nonce: record_nonce(7),
        };
        assert_eq!(RecordHeader::decode(&h.encode()).unwrap(), h);
        for flags in [FLAG_ZSTD | FLAG_LZ4, 0b1000, 0x80] {
            let bad = RecordHeader { flags, ..h };
            assert!(RecordHeader::decode(&bad.encode()).is_err(), "{flags:#x}");
        }
    }

    #[test]
    fn footer_round_trip_and_bounds() {
        let entries: Vec<FooterEntry> = (0..3u8)
            .map(|i| FooterEntry {
                id: ChunkId::from_bytes([i; 32]),
                offset: 64 + u64::from(i) * 100,
                len: 100,
                raw_len: 50,
            })
            .collect();
        let foff = 364;
        let f = encode_footer(&entries, foff);
        assert_eq!(f.len(), footer_len(3));
        let file_len = foff + f.len() as u64;
        let (off, len, crc) = decode_trailer(&f[f.len() - TRAILER_LEN..], file_len).unwrap();
        assert_eq!(off, foff);
        let body = &f[..usize::try_from(len).unwrap()];
        assert_eq!(decode_footer(body, crc, foff).unwrap(), entries);
        assert!(decode_footer(body, crc, 300).is_err());
        assert!(decode_trailer(&f[f.len() - TRAILER_LEN..], file_len + 1).is_err());
    }

    #[test]
    fn index_entry_round_trip() {
        let e = IndexEntry {
            flags: 1,
            pack: PackId::from_bytes([4; 16]),
            offset: 1 << 40,
            len: 77,
            raw_len: 99,
            digest: None,
            uploader: None,
        };
        assert_eq!(IndexEntry::decode(&e.encode()).unwrap(), e);
        assert!(IndexEntry::decode(&e.encode()[..10]).is_err());
        let sealed = IndexEntry {
            flags: FLAG_SEALED,
            digest: Some([9; ENVELOPE_DIGEST_LEN]),
            uploader: Some([5; 16]),
            ..e
        };
        assert_eq!(sealed.encode().len(), INDEX_ENTRY_LEN + SEALED_TAIL_LEN);
        assert_eq!(IndexEntry::decode(&sealed.encode()).unwrap(), sealed);
    }

    #[test]
    fn header_round_trip() {
        let h = PackHeader {
            pack: PackId::from_bytes([1; 16]),
            shard: ShardId(3),
            repo_id: RepositoryId::from_bytes([2; 16]),
            created_us: 123,
        };
        assert_eq!(PackHeader::decode(&h.encode()).unwrap(), h);
    }
}
