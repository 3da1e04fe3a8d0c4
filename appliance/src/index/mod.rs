//! The dedup index of one shard: `ChunkId -> IndexEntry` (pack, offset, length, flags).
//!
//! The index is a cache of what pack files say: an entry is inserted only after the bytes it
//! points at are durable (fsynced), and `rebuild-index` can always recreate it from pack footers.
//! Two engines implement [`ChunkIndex`] and run the same conformance suite ([`conformance`]):
//! RocksDB ([`rocks`], the real one, one instance per shard under `index/shard-N`) and an
//! in-memory map ([`memory`]). [`need`] holds the shard's in-memory set of stored ids.
//!
//! Owns: the index's key layout (chunk entries, `o`‖owner‖id ownership records, `!meta:` keys).
//! Must never touch pack files or the network; entries point at bytes the pack writer already
//! made durable.

mod memory;
pub mod need;
mod rocks;

#[cfg(test)]
mod conformance;

use coffer_proto::{ChunkId, CHUNK_ID_LEN};

use crate::error::RepoError;
use crate::pack::format::IndexEntry;

pub use memory::MemIndex;
pub use need::NeedSet;
pub use rocks::{OpenMode, RocksIndex};

/// Meta key under which a shard records its open (unsealed) pack.
pub const META_OPEN_PACK: &[u8] = b"!meta:open-pack";
/// Meta key written when the index is created; its absence means the index is not ours.
pub const META_CREATED: &[u8] = b"!meta:created";

/// Meta key listing packs abandoned after a failed write (16-byte pack ids, concatenated): the
/// next start seals each in place and indexes its records.
pub const META_POISONED: &[u8] = b"!meta:poisoned-packs";

/// Meta key listing chunks found damaged (32-byte ids, concatenated; C8): `Need` answers them
/// missing, so the next backup holding their data uploads them again, and that upload replaces
/// the damaged record (the index then points at the new one) and takes them off the list.
/// Written by a shard whose read of a record failed to authenticate, and by `verify` (stopped
/// appliance).
pub const META_DAMAGED: &[u8] = b"!meta:damaged-chunks";

/// Meta key listing sealed records replaced by an upload of a different envelope (sealed mode's
/// poisoning defence): entries of chunk id (32) ‖ time µs (8, LE) ‖ the replaced index entry
/// (82: with its digest and uploader), oldest first, at most [`MAX_REPLACED`] (older ones are dropped).
/// `verify` reports them; the replaced records stay in their packs until compaction.
pub const META_REPLACED: &[u8] = b"!meta:replaced-chunks";
/// Most replacements remembered per shard.
pub const MAX_REPLACED: usize = 4096;
const REPLACED_LEN: usize = 32 + 8 + REPLACED_ENTRY_LEN;
const REPLACED_ENTRY_LEN: usize =
    crate::pack::format::INDEX_ENTRY_LEN + crate::pack::format::SEALED_TAIL_LEN;

/// A replaced sealed record, as [`META_REPLACED`] remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub id: ChunkId,
    pub time_us: i64,
    pub old: IndexEntry,
}

/// The replacements `index` remembers, oldest first.
///
/// # Errors
/// Engine errors.
pub fn replaced(index: &dyn ChunkIndex) -> Result<Vec<Replaced>, RepoError> {
    Ok(index
        .get_meta(META_REPLACED)?
        .unwrap_or_default()
        .chunks_exact(REPLACED_LEN)
        .filter_map(|b| {
            Some(Replaced {
                id: ChunkId::from_slice(&b[..32]).ok()?,
                time_us: i64::from_le_bytes(b[32..40].try_into().ok()?),
                old: IndexEntry::decode(&b[40..]).ok()?,
            })
        })
        .collect())
}

/// Appends replacements (durably), keeping the newest [`MAX_REPLACED`].
///
/// # Errors
/// Engine errors.
pub fn add_replaced(
    index: &dyn ChunkIndex,
    old: &[(ChunkId, IndexEntry)],
    time_us: i64,
) -> Result<(), RepoError> {
    let mut raw = index.get_meta(META_REPLACED)?.unwrap_or_default();
    for (id, e) in old {
        let mut entry = e.encode();
        entry.resize(REPLACED_ENTRY_LEN, 0);
        raw.extend_from_slice(id.as_bytes());
        raw.extend_from_slice(&time_us.to_le_bytes());
        raw.extend_from_slice(&entry);
    }
    let keep = MAX_REPLACED * REPLACED_LEN;
    if raw.len() > keep {
        raw.drain(..raw.len() - keep);
    }
    index.put_meta(META_REPLACED, Some(&raw))
}

/// The chunks `index` lists as damaged.
///
/// # Errors
/// Engine errors.
pub fn damaged(index: &dyn ChunkIndex) -> Result<std::collections::HashSet<ChunkId>, RepoError> {
    Ok(index
        .get_meta(META_DAMAGED)?
        .unwrap_or_default()
        .chunks_exact(CHUNK_ID_LEN)
        .filter_map(|b| ChunkId::from_slice(b).ok())
        .collect())
}

/// Records `ids` as the damaged chunks of `index` (durably; none: the key is removed).
///
/// # Errors
/// Engine errors.
pub fn set_damaged(
    index: &dyn ChunkIndex,
    ids: &std::collections::HashSet<ChunkId>,
) -> Result<(), RepoError> {
    if ids.is_empty() {
        return index.put_meta(META_DAMAGED, None);
    }
    let mut sorted: Vec<&ChunkId> = ids.iter().collect();
    sorted.sort();
    let raw: Vec<u8> = sorted.iter().flat_map(|id| *id.as_bytes()).collect();
    index.put_meta(META_DAMAGED, Some(&raw))
}

/// Length of an ownership key: `o` + 16-byte account key + chunk id (never a chunk entry's 32).
pub(crate) const OWNED_KEY_LEN: usize = 1 + 16 + CHUNK_ID_LEN;

pub(crate) fn owned_key(owner: &[u8; 16], id: &ChunkId) -> [u8; OWNED_KEY_LEN] {
    let mut k = [0u8; OWNED_KEY_LEN];
    k[0] = b'o';
    k[1..17].copy_from_slice(owner);
    k[17..].copy_from_slice(id.as_bytes());
    k
}

/// An index entry that does not decode (`verify` reports it; loading the need set fails on it).
#[derive(Debug, thiserror::Error)]
pub enum BadEntry {
    #[error("index key {0} is not a chunk id: {1}")]
    Key(String, #[source] coffer_proto::IdError),
    #[error("index entry of chunk {0}: {1}")]
    Value(ChunkId, #[source] crate::pack::format::FormatError),
}

/// One index entry, or why it could not be decoded.
pub type EntryResult = Result<(ChunkId, IndexEntry), BadEntry>;

/// A shard's index engine.
pub trait ChunkIndex: Send + Sync {
    /// Looks up many ids at once.
    ///
    /// # Errors
    /// Engine errors.
    fn get_many(&self, ids: &[ChunkId]) -> Result<Vec<Option<IndexEntry>>, RepoError>;
    /// Inserts entries atomically. `sync` forces them to stable storage before returning.
    ///
    /// # Errors
    /// Engine errors.
    fn insert_batch(&self, entries: &[(ChunkId, IndexEntry)], sync: bool) -> Result<(), RepoError>;
    /// Reads a meta value.
    ///
    /// # Errors
    /// Engine errors.
    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RepoError>;
    /// Writes (`Some`) or deletes (`None`) a meta value durably.
    ///
    /// # Errors
    /// Engine errors.
    fn put_meta(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), RepoError>;
    /// Every chunk entry, in id order. Undecodable entries are returned as errors.
    ///
    /// # Errors
    /// Engine errors.
    fn entries(&self) -> Result<Vec<EntryResult>, RepoError>;
    /// Calls `f` for every chunk entry, in id order, without holding them all in memory (the
    /// GC's scans of 10⁸ entries). Stops at the first undecodable entry or error of `f`.
    ///
    /// # Errors
    /// Engine errors, undecodable entries, and what `f` returns.
    fn scan(
        &self,
        f: &mut dyn FnMut(&ChunkId, &IndexEntry) -> Result<(), RepoError>,
    ) -> Result<(), RepoError>;
    /// About how many keys the index holds (sizes the GC's tables; may be off either way).
    ///
    /// # Errors
    /// Engine errors.
    fn approximate_len(&self) -> Result<u64, RepoError>;
    /// Removes chunk entries (the GC's sweep) atomically; `sync` as for [`Self::insert_batch`].
    ///
    /// # Errors
    /// Engine errors.
    fn delete_batch(&self, ids: &[ChunkId], sync: bool) -> Result<(), RepoError>;
    /// Makes every earlier write durable.
    ///
    /// # Errors
    /// Engine errors.
    fn sync(&self) -> Result<(), RepoError>;
    /// Records that the account with ownership key `owner` holds `ids` (one of its sessions
    /// uploaded them, verified, and they are durable). Not synced: a record lost in a crash only
    /// costs a re-upload.
    ///
    /// # Errors
    /// Engine errors.
    fn insert_owned(&self, owner: &[u8; 16], ids: &[ChunkId]) -> Result<(), RepoError>;
    /// Which of `ids` the account with ownership key `owner` holds.
    ///
    /// # Errors
    /// Engine errors.
    fn owned(&self, owner: &[u8; 16], ids: &[ChunkId]) -> Result<Vec<bool>, RepoError>;
}

/// An engine failure, as the repository error it is.
pub(crate) fn ie(e: impl std::fmt::Display) -> RepoError {
    RepoError::Index(e.to_string())
}
