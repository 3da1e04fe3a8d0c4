//! Recovery from pack files alone: sealing a pack a crash left open, and rebuilding a whole
//! index from pack footers (`rebuild-index`). Ordinary blocking file I/O: this runs before a
//! shard serves, or offline.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use coffer_proto::{PackId, ShardId};

use super::format::{encode_footer, FooterEntry, IndexEntry};
use super::read::{footer_entries, read_footer, read_header, scan};
use crate::index::{ChunkIndex, META_OPEN_PACK};
use crate::keys::MasterKey;

/// Largest record a scan accepts (max chunk plus headroom).
pub const MAX_RECORD_LEN: u64 = 64 << 20;

/// Seals a pack that was open when the appliance stopped: keeps every record that decodes and
/// authenticates, cuts what follows (a torn write), appends the footer and fsyncs. Returns the
/// footer entries.
///
/// # Errors
/// I/O errors, as text.
pub fn seal_in_place(path: &Path, master: &MasterKey) -> Result<Vec<FooterEntry>, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Ok(entries) = read_footer(&file) {
        return Ok(entries); // already sealed
    }
    let header = read_header(&file)?;
    let key = master.pack_key(&header.pack);
    let s = scan(path, &key, MAX_RECORD_LEN)?;
    let entries = footer_entries(&s.records);
    let footer = encode_footer(&entries, s.valid_end);
    file.set_len(s.valid_end).map_err(|e| e.to_string())?;
    file.write_all_at(&footer, s.valid_end)
        .map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())?;
    Ok(entries)
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
                },
            )
        })
        .collect()
}

/// Reads the flags byte of each record (footers do not carry them).
fn record_flags(path: &Path, entries: &[FooterEntry]) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    entries
        .iter()
        .map(|e| {
            let mut b = [0u8; 1];
            file.read_exact_at(&mut b, e.offset + 4)
                .map_err(|x| x.to_string())?;
            Ok(b[0])
        })
        .collect()
}

/// At shard start: if the index names an open pack, seal it and index its records. Returns how
/// many records were recovered.
///
/// # Errors
/// I/O and index errors, as text; the shard must not serve after one.
pub fn recover_open_pack(
    paths: &crate::repo::RepoPaths,
    master: &MasterKey,
    index: &dyn ChunkIndex,
) -> Result<usize, String> {
    let Some(raw) = index.get_meta(META_OPEN_PACK).map_err(|e| e.to_string())? else {
        return Ok(0);
    };
    let id = PackId::from_slice(&raw).map_err(|e| e.to_string())?;
    let path = paths.pack(&id);
    if !path.exists() {
        // Created in the index but the file never made it: nothing was acknowledged from it.
        index
            .put_meta(META_OPEN_PACK, None)
            .map_err(|e| e.to_string())?;
        return Ok(0);
    }
    let entries = seal_in_place(&path, master)?;
    let flags = record_flags(&path, &entries)?;
    let batch = index_entries(id, &entries, |i| flags[i]);
    index
        .insert_batch(&batch, true)
        .map_err(|e| e.to_string())?;
    index
        .put_meta(META_OPEN_PACK, None)
        .map_err(|e| e.to_string())?;
    Ok(entries.len())
}

/// Summary of a rebuild.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RebuildStats {
    pub packs: u64,
    pub unsealed_packs_sealed: u64,
    pub chunks: u64,
}

/// Rebuilds every shard index from the packs under `paths`. `indexes[s]` must be empty, freshly
/// created indexes. Aborts on the first listing or read error: a partial index must never be
/// presented as complete.
///
/// # Errors
/// Any error, as text.
pub fn rebuild(
    paths: &crate::repo::RepoPaths,
    master: &MasterKey,
    indexes: &[&dyn ChunkIndex],
) -> Result<RebuildStats, String> {
    let shards = u16::try_from(indexes.len()).map_err(|_| "too many shards".to_string())?;
    let mut stats = RebuildStats::default();
    for (id, path) in paths
        .list_packs()
        .map_err(|e| format!("listing packs: {e}"))?
    {
        let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let header = read_header(&file).map_err(|e| format!("{}: {e}", path.display()))?;
        if header.pack != id {
            return Err(format!(
                "{}: header names pack {}",
                path.display(),
                header.pack
            ));
        }
        let entries = if let Ok(e) = read_footer(&file) {
            e
        } else {
            stats.unsealed_packs_sealed += 1;
            seal_in_place(&path, master)?
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
            indexes[s]
                .insert_batch(batch, false)
                .map_err(|e| e.to_string())?;
        }
        stats.packs += 1;
        stats.chunks += entries.len() as u64;
    }
    for idx in indexes {
        idx.sync().map_err(|e| e.to_string())?;
    }
    Ok(stats)
}
