//! Recovery from pack files alone: sealing a pack a crash left open, and rebuilding a whole
//! index from pack footers (`rebuild-index`). Ordinary blocking file I/O: this runs before a
//! shard serves, or offline.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use coffer_proto::{PackId, ShardId};

use super::format::{encode_footer, FooterEntry, IndexEntry};
use super::read::{footer_entries, read_footer, read_header, scan};
use super::PackFileError;
use crate::crypto::Encryption;
use crate::index::{ChunkIndex, META_OPEN_PACK, META_POISONED};

/// Largest record a scan accepts (max chunk plus headroom).
pub const MAX_RECORD_LEN: u64 = 64 << 20;

/// Why an unsealed pack could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// No readable header: the pack's first write never became durable, so nothing in it was
    /// ever acknowledged. It is set aside, never fatal.
    #[error("torn pack (no readable header): {0}")]
    Torn(PackFileError),
    /// Reading or writing failed (a full disk among others).
    #[error(transparent)]
    Io(PackFileError),
}

/// Seals a pack that was open when the appliance stopped: keeps every record that decodes and
/// authenticates, cuts what follows (a torn write; done first, so that it frees space on a full
/// disk), appends the footer and fsyncs. Returns the footer entries.
///
/// # Errors
/// [`SealError::Torn`] when the header is unreadable; [`SealError::Io`] otherwise.
pub fn seal_in_place(path: &Path, master: &dyn Encryption) -> Result<Vec<FooterEntry>, SealError> {
    let io = |what: &str, e: std::io::Error| SealError::Io(PackFileError::io(what, e).at(path));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io("opening", e))?;
    if let Ok(entries) = read_footer(&file) {
        return Ok(entries); // already sealed
    }
    let header = read_header(&file).map_err(|e| SealError::Torn(e.at(path)))?;
    let key = master.pack_cipher(&header.pack);
    let s = scan(path, key.as_ref(), MAX_RECORD_LEN).map_err(SealError::Io)?;
    let entries = footer_entries(&s.records);
    let footer = encode_footer(&entries, s.valid_end);
    file.set_len(s.valid_end)
        .map_err(|e| io("cutting a torn write", e))?;
    file.sync_all().map_err(|e| io("fsync", e))?;
    file.write_all_at(&footer, s.valid_end)
        .map_err(|e| io("writing the footer", e))?;
    file.sync_all().map_err(|e| io("fsync", e))?;
    Ok(entries)
}

/// Moves a pack that holds nothing acknowledged out of the way (`<id>.torn` beside it, which no
/// listing of packs takes for a pack). Never deletes: an operator can still look at it.
///
/// # Errors
/// The rename failed.
pub fn set_aside(path: &Path, why: &str) -> Result<PathBuf, PackFileError> {
    let mut to = path.as_os_str().to_owned();
    to.push(".torn");
    let to = PathBuf::from(to);
    std::fs::rename(path, &to).map_err(|e| PackFileError::io("setting it aside", e).at(path))?;
    tracing::warn!(
        pack = %path.display(),
        set_aside = %to.display(),
        reason = why,
        "pack set aside: it holds no acknowledged chunk"
    );
    Ok(to)
}

fn index_entries(
    pack: PackId,
    entries: &[FooterEntry],
    flags_of: impl Fn(usize) -> u8,
) -> Vec<(coffer_proto::ChunkId, IndexEntry)> {
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            (
                e.id,
                IndexEntry {
                    flags: flags_of(i),
                    pack,
                    offset: e.offset,
                    len: e.len,
                    raw_len: e.raw_len,
                    // Not in footers: a sealed record recovered here is not checked against
                    // an upload's envelope until it is written again.
                    digest: None,
                    uploader: None,
                },
            )
        })
        .collect()
}

/// Reads the flags byte of each record (footers do not carry them).
fn record_flags(path: &Path, entries: &[FooterEntry]) -> Result<Vec<u8>, PackFileError> {
    let file = std::fs::File::open(path).map_err(|e| PackFileError::io("opening", e).at(path))?;
    entries
        .iter()
        .map(|e| {
            let mut b = [0u8; 1];
            file.read_exact_at(&mut b, e.offset + 4).map_err(|x| {
                PackFileError::io(format!("reading the record at {}", e.offset), x).at(path)
            })?;
            Ok(b[0])
        })
        .collect()
}

/// At shard start: seals the pack a crash left open and the packs abandoned after failed writes
/// (a full disk), and indexes their records. Returns how many records were recovered.
///
/// Never fatal because of the packs themselves: a pack without a readable header is set aside
/// (nothing in it was acknowledged); one that cannot be sealed now (no space for its footer) has
/// its records indexed and stays listed for the next start.
///
/// # Errors
/// Index errors, as text; the shard must not serve after one.
pub fn recover_open_pack(
    paths: &crate::repo::RepoPaths,
    master: &dyn Encryption,
    index: &dyn ChunkIndex,
) -> Result<usize, PackFileError> {
    let mut todo: Vec<PackId> = Vec::new();
    if let Some(raw) = index.get_meta(META_OPEN_PACK)? {
        todo.push(PackId::from_slice(&raw)?);
    }
    if let Some(list) = index.get_meta(META_POISONED)? {
        for raw in list.chunks_exact(16) {
            let id = PackId::from_slice(raw)?;
            if !todo.contains(&id) {
                todo.push(id);
            }
        }
    }
    if todo.is_empty() {
        return Ok(0);
    }
    let mut recovered = 0;
    let mut retry = Vec::new();
    for id in todo {
        let path = paths.pack(&id);
        if !path.exists() {
            // Created in the index but the file never made it: nothing was acknowledged from it.
            continue;
        }
        match seal_in_place(&path, master) {
            Ok(entries) => {
                let flags = record_flags(&path, &entries)?;
                let batch = index_entries(id, &entries, |i| flags[i]);
                index.insert_batch(&batch, true)?;
                recovered += entries.len();
            }
            Err(SealError::Torn(why)) => {
                set_aside(&path, &why.to_string())?;
            }
            Err(SealError::Io(why)) => {
                // Keep serving: index what authenticates now, seal at a later start.
                tracing::error!(pack = %id, error = %why, "cannot seal the pack now; its records are indexed and it will be sealed at the next start");
                let header = std::fs::File::open(&path)
                    .map_err(|e| PackFileError::io("opening", e))
                    .and_then(|f| read_header(&f))
                    .map_err(|e| e.at(&path))?;
                let s = scan(
                    &path,
                    master.pack_cipher(&header.pack).as_ref(),
                    MAX_RECORD_LEN,
                )?;
                let entries = footer_entries(&s.records);
                let batch = index_entries(id, &entries, |i| s.records[i].header.flags);
                index.insert_batch(&batch, true)?;
                recovered += entries.len();
                retry.extend_from_slice(id.as_bytes());
            }
        }
    }
    index.put_meta(META_OPEN_PACK, None)?;
    index.put_meta(META_POISONED, (!retry.is_empty()).then_some(&retry[..]))?;
    Ok(recovered)
}

/// Summary of a rebuild.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RebuildStats {
    pub packs: u64,
    /// Packs without a readable header or footer (never acknowledged), set aside.
    pub set_aside: u64,
    pub unsealed_packs_sealed: u64,
    pub chunks: u64,
}

/// Rebuilds every shard index from the packs under `paths`. `indexes[s]` must be empty, freshly
/// created indexes. Aborts on the first listing or read error: a partial index must never be
/// presented as complete.
///
/// # Errors
/// The first listing, read, seal or index error, naming the pack.
pub fn rebuild(
    paths: &crate::repo::RepoPaths,
    master: &dyn Encryption,
    indexes: &[&dyn ChunkIndex],
) -> Result<RebuildStats, PackFileError> {
    let shards = u16::try_from(indexes.len()).expect("a repository has at most u16::MAX shards");
    let mut stats = RebuildStats::default();
    for (id, path) in paths
        .list_packs()
        .map_err(|e| PackFileError::io("listing packs", e).at(&paths.packs()))?
    {
        let file =
            std::fs::File::open(&path).map_err(|e| PackFileError::io("opening", e).at(&path))?;
        let header = match read_header(&file) {
            Ok(h) => h,
            Err(why) if read_footer(&file).is_err() => {
                // Neither header nor footer: a pack whose first write never became durable.
                set_aside(&path, &why.to_string())?;
                stats.set_aside += 1;
                continue;
            }
            Err(why) => return Err(why.at(&path)),
        };
        if header.pack != id {
            return Err(
                PackFileError::from(crate::pack::format::FormatError::Corrupt(format!(
                    "its header names pack {}",
                    header.pack
                )))
                .at(&path),
            );
        }
        let entries = if let Ok(e) = read_footer(&file) {
            e
        } else {
            stats.unsealed_packs_sealed += 1;
            seal_in_place(&path, master).map_err(|e| match e {
                SealError::Torn(e) | SealError::Io(e) => e,
            })?
        };
        let flags = record_flags(&path, &entries)?;
        let mut per_shard: Vec<Vec<_>> = vec![Vec::new(); indexes.len()];
        for (i, e) in index_entries(id, &entries, |i| flags[i])
            .into_iter()
            .enumerate()
        {
            let s = ShardId::for_chunk(&entries[i].id, shards);
            per_shard[s.index()].push(e);
        }
        for (s, batch) in per_shard.iter().enumerate() {
            indexes[s].insert_batch(batch, false)?;
        }
        stats.packs += 1;
        stats.chunks += entries.len() as u64;
    }
    for idx in indexes {
        idx.sync()?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::MemIndex;
    use crate::repo::RepoPaths;

    /// Issue 10, item 4: a full disk leaves a 0-byte (or torn-header) pack recorded as the open
    /// pack, and poisoned packs listed. Recovery sets the torn ones aside and never fails
    /// because of them; a second recovery finds nothing left to do.
    #[test]
    fn torn_open_and_poisoned_packs_are_set_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let paths = RepoPaths::new(dir.path());
        let master = crate::crypto::keys::MasterKey::generate();
        let index = MemIndex::default();
        let empty = PackId::from_bytes([1; 16]);
        let torn = PackId::from_bytes([2; 16]);
        for (id, bytes) in [(empty, Vec::new()), (torn, vec![0u8; 100])] {
            let p = paths.pack(&id);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, bytes).unwrap();
        }
        index
            .put_meta(META_OPEN_PACK, Some(empty.as_bytes()))
            .unwrap();
        index
            .put_meta(META_POISONED, Some(torn.as_bytes()))
            .unwrap();
        assert_eq!(recover_open_pack(&paths, &master, &index).unwrap(), 0);
        for id in [empty, torn] {
            let p = paths.pack(&id);
            assert!(!p.exists(), "{} still taken for a pack", p.display());
            let mut aside = p.into_os_string();
            aside.push(".torn");
            assert!(PathBuf::from(aside).exists(), "set aside, not deleted");
        }
        assert_eq!(index.get_meta(META_OPEN_PACK).unwrap(), None);
        assert_eq!(index.get_meta(META_POISONED).unwrap(), None);
        assert!(paths.list_packs().unwrap().is_empty());
        assert_eq!(recover_open_pack(&paths, &master, &index).unwrap(), 0);
        // rebuild-index sets a torn pack aside instead of aborting on it.
        let third = paths.pack(&PackId::from_bytes([3; 16]));
        std::fs::create_dir_all(third.parent().unwrap()).unwrap();
        std::fs::write(&third, b"").unwrap();
        let fresh = MemIndex::default();
        let stats = rebuild(&paths, &master, &[&fresh]).unwrap();
        assert_eq!((stats.packs, stats.set_aside), (0, 1));
        assert!(!third.exists());
    }
}
