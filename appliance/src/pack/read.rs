//! Reading packs with ordinary file I/O: record decryption (shared with the shard's read path),
//! and whole-pack scans for `verify`, `rebuild-index` and the recovery of a crashed open pack.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use coffer_proto::{ChunkId, DedupKey};

use super::format::{
    compression_of, decode_footer, decode_trailer, FooterEntry, FormatError, PackHeader,
    RecordHeader, PACK_HEADER_LEN, RECORD_AAD_LEN, RECORD_HEADER_LEN, TRAILER_LEN,
};
use super::PackFileError;
use crate::crypto::{RecordCipher, TAG_LEN};

fn corrupt(s: impl Into<String>) -> FormatError {
    FormatError::Corrupt(s.into())
}

/// Decrypts one record (`header || payload`) in place. Returns the header and the stored
/// plaintext (the zstd frame when [`FLAG_ZSTD`] is set).
///
/// # Errors
/// [`FormatError`] when the header is damaged, lengths disagree, or the tag does not verify.
pub fn open_record<'a>(
    key: &dyn RecordCipher,
    rec: &'a mut [u8],
) -> Result<(RecordHeader, &'a [u8]), FormatError> {
    let h = RecordHeader::decode(rec)?;
    if rec.len() as u64 != h.record_len() || (h.stored_len as usize) < TAG_LEN {
        return Err(corrupt(format!(
            "record of chunk {} has inconsistent lengths",
            h.id
        )));
    }
    let (head, payload) = rec.split_at_mut(RECORD_HEADER_LEN);
    let n = key
        .open(h.nonce, &head[..RECORD_AAD_LEN], payload)
        .ok_or_else(|| corrupt(format!("chunk {}: authentication tag mismatch", h.id)))?;
    Ok((h, &payload[..n]))
}

/// Turns a record's stored plaintext back into the chunk's bytes, bounded by `raw_len`.
///
/// # Errors
/// [`FormatError`] when decompression fails or the length differs.
pub fn raw_plaintext(h: &RecordHeader, stored: &[u8]) -> Result<Vec<u8>, FormatError> {
    coffer_proto::codec::decode(compression_of(h.flags)?, stored, h.raw_len as usize)
        .map_err(|e| corrupt(format!("chunk {}: {e}", h.id)))
}

/// A record found while scanning a pack from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedRecord {
    pub header: RecordHeader,
    pub offset: u64,
}

/// What a linear scan found.
#[derive(Debug)]
pub struct Scan {
    pub header: PackHeader,
    pub records: Vec<ScannedRecord>,
    /// Offset just past the last valid record.
    pub valid_end: u64,
    pub file_len: u64,
}

/// Reads the pack header.
///
/// # Errors
/// I/O errors and [`FormatError`]s.
pub fn read_header(file: &File) -> Result<PackHeader, PackFileError> {
    let mut b = [0u8; PACK_HEADER_LEN];
    file.read_exact_at(&mut b, 0)
        .map_err(|e| PackFileError::io("reading the pack header", e))?;
    Ok(PackHeader::decode(&b)?)
}

/// Reads a sealed pack's footer.
///
/// # Errors
/// I/O or format errors; an unsealed pack is an error here.
pub fn read_footer(file: &File) -> Result<Vec<FooterEntry>, PackFileError> {
    let len = file
        .metadata()
        .map_err(|e| PackFileError::io("reading its size", e))?
        .len();
    if len < (PACK_HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(corrupt("pack too short to be sealed").into());
    }
    let mut t = [0u8; TRAILER_LEN];
    file.read_exact_at(&mut t, len - TRAILER_LEN as u64)
        .map_err(|e| PackFileError::io("reading the trailer", e))?;
    let (off, flen, crc) = decode_trailer(&t, len)?;
    let flen = usize::try_from(flen)
        .ok()
        .filter(|n| *n <= 1 << 30)
        .ok_or_else(|| corrupt("footer too large"))?;
    let mut body = vec![0u8; flen];
    file.read_exact_at(&mut body, off)
        .map_err(|e| PackFileError::io("reading the footer", e))?;
    Ok(decode_footer(&body, crc, off)?)
}

/// Reads one whole record at `offset`.
///
/// # Errors
/// I/O errors.
pub fn read_record_bytes(file: &File, offset: u64, len: u32) -> Result<Vec<u8>, PackFileError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| PackFileError::io(format!("reading {len} bytes at {offset}"), e))?;
    Ok(buf)
}

/// Scans records from the start of the pack until the first one that does not decode and
/// authenticate (`key`), or the footer. Used to recover an open pack after a crash.
///
/// # Errors
/// When the header itself cannot be read.
pub fn scan(path: &Path, key: &dyn RecordCipher, max_record: u64) -> Result<Scan, PackFileError> {
    let file = File::open(path).map_err(|e| PackFileError::io("opening", e).at(path))?;
    let header = read_header(&file).map_err(|e| e.at(path))?;
    let file_len = file
        .metadata()
        .map_err(|e| PackFileError::io("reading its size", e).at(path))?
        .len();
    let mut records = Vec::new();
    let mut pos = PACK_HEADER_LEN as u64;
    loop {
        if pos + RECORD_HEADER_LEN as u64 > file_len {
            break;
        }
        let mut hb = [0u8; RECORD_HEADER_LEN];
        if file.read_exact_at(&mut hb, pos).is_err() {
            break;
        }
        let Ok(h) = RecordHeader::decode(&hb) else {
            break;
        };
        let len = h.record_len();
        if len > max_record || pos + len > file_len {
            break;
        }
        let Ok(mut rec) = read_record_bytes(&file, pos, u32::try_from(len).unwrap_or(u32::MAX))
        else {
            break;
        };
        if open_record(key, &mut rec).is_err() {
            break;
        }
        records.push(ScannedRecord {
            header: h,
            offset: pos,
        });
        pos += len;
    }
    Ok(Scan {
        header,
        records,
        valid_end: pos,
        file_len,
    })
}

/// Entries of a record list as footer lines.
#[must_use]
pub fn footer_entries(records: &[ScannedRecord]) -> Vec<FooterEntry> {
    records
        .iter()
        .map(|r| FooterEntry {
            id: r.header.id,
            offset: r.offset,
            len: u32::try_from(r.header.record_len()).unwrap_or(u32::MAX),
            raw_len: r.header.raw_len,
        })
        .collect()
}

/// Checks that a decrypted chunk hashes to `id`.
#[must_use]
pub fn hashes_to(dedup_key: &DedupKey, id: &ChunkId, raw: &[u8]) -> bool {
    coffer_proto::chunk_id(dedup_key, raw) == *id
}
