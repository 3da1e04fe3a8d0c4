//! `verify`: invariants I1, I2 and the footer half of I5.
//!
//! `verify` opens every shard index read-only, so it can run beside a serving appliance. It never
//! reports "0 errors" for anything it could not read: every listing, read or decode failure is an
//! error.

use std::collections::{HashMap, HashSet};
use std::fs::File;

use coffer_proto::{ChunkId, PackId, ShardId};

use crate::crypto::keys::MasterKey;
use crate::crypto::Encryption;
use crate::error::RepoError;
use crate::index::{ChunkIndex, OpenMode, RocksIndex, META_OPEN_PACK, META_POISONED};
use crate::pack::format::{FooterEntry, IndexEntry, RecordHeader, RECORD_HEADER_LEN};
use crate::pack::read::{
    hashes_to, open_record, raw_plaintext, read_footer, read_header, read_record_bytes,
};
use crate::repo::{RepoConfig, RepoPaths};

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub chunks: u64,
    pub packs: u64,
    pub bytes_read: u64,
    pub errors: Vec<String>,
    /// Not wrong, but worth an operator's look (e.g. packs nothing in the index points at).
    pub warnings: Vec<String>,
}

struct PackView {
    file: File,
    len: u64,
    footer: Option<HashMap<coffer_proto::ChunkId, FooterEntry>>,
}

/// Checks every index entry of every shard. With `master` (`--read-data`), also decrypts every
/// chunk and checks that it hashes to its id (I1).
///
/// # Errors
/// Only when an index cannot be opened or listed at all; everything else is reported.
pub fn verify(
    paths: &RepoPaths,
    cfg: &RepoConfig,
    master: Option<&MasterKey>,
) -> Result<VerifyReport, RepoError> {
    let mut rep = VerifyReport::default();
    let mut packs: HashMap<PackId, Option<PackView>> = HashMap::new();
    // Packs that may lack a footer: each shard's open pack, and packs waiting to be sealed.
    let mut unsealed: HashSet<PackId> = HashSet::new();
    for shard in cfg.shard_ids() {
        let idx = RocksIndex::open(&paths.shard_index(shard), OpenMode::ReadOnly, 64 << 20)?;
        for key in [META_OPEN_PACK, META_POISONED] {
            if let Some(raw) = idx.get_meta(key)? {
                unsealed.extend(
                    raw.chunks_exact(16)
                        .filter_map(|r| PackId::from_slice(r).ok()),
                );
            }
        }
        for item in idx.entries()? {
            let (id, e) = match item {
                Ok(x) => x,
                Err(err) => {
                    rep.errors
                        .push(format!("{shard}: undecodable index entry {err}"));
                    continue;
                }
            };
            check_entry(&mut rep, &mut packs, paths, cfg, master, shard, id, e);
        }
    }
    rep.packs = packs.len() as u64;
    // A sealed pack's footer lists every record: without it the index cannot be rebuilt from
    // the pack (I5), so a missing or damaged footer is an error, not silence.
    let mut no_footer: Vec<String> = packs
        .iter()
        .filter(|(id, v)| v.as_ref().is_some_and(|v| v.footer.is_none()) && !unsealed.contains(*id))
        .map(|(id, _)| id.to_hex())
        .collect();
    no_footer.sort();
    for id in no_footer {
        rep.errors.push(format!(
            "I5: pack {id} has no valid footer (missing, truncated or damaged): its chunks cannot \
             be re-indexed from it; `rebuild-index` seals it again from the records that \
             authenticate"
        ));
    }
    // Packs the index never points at: left by a crash before their first group commit was
    // indexed (a running appliance's newest pack can be one for a moment), or copied in.
    match paths.list_packs() {
        Ok(all) => {
            for (id, path) in all {
                if !packs.contains_key(&id) {
                    rep.warnings.push(format!(
                        "pack {id} ({}) holds no indexed chunk: its space serves nothing; \
                         `rebuild-index` re-indexes whatever valid records it holds",
                        path.display()
                    ));
                }
            }
        }
        Err(e) => rep.errors.push(format!("cannot list the pack files: {e}")),
    }
    Ok(rep)
}

/// Checks one index entry against its pack (and with `master`, its data).
#[allow(clippy::too_many_arguments)] // the state of one verify run, threaded through its loop
fn check_entry(
    rep: &mut VerifyReport,
    packs: &mut HashMap<PackId, Option<PackView>>,
    paths: &RepoPaths,
    cfg: &RepoConfig,
    master: Option<&MasterKey>,
    shard: ShardId,
    id: ChunkId,
    e: IndexEntry,
) {
    rep.chunks += 1;
    if ShardId::for_chunk(&id, cfg.shards) != shard {
        rep.errors.push(format!(
            "chunk {id} is indexed in {shard}, which does not own it"
        ));
    }
    let view = packs.entry(e.pack).or_insert_with(|| {
        let path = paths.pack(&e.pack);
        let file = File::open(&path).ok()?;
        read_header(&file).ok()?;
        let len = file.metadata().ok()?.len();
        let footer = read_footer(&file)
            .ok()
            .map(|f| f.into_iter().map(|x| (x.id, x)).collect());
        Some(PackView { file, len, footer })
    });
    let Some(view) = view else {
        rep.errors.push(format!(
            "I2: chunk {id} points at pack {} which is missing or unreadable",
            e.pack
        ));
        return;
    };
    if e.offset + u64::from(e.len) > view.len || (e.len as usize) < RECORD_HEADER_LEN {
        rep.errors
            .push(format!("I2: chunk {id} points outside pack {}", e.pack));
        return;
    }
    if let Some(footer) = &view.footer {
        match footer.get(&id) {
            Some(f) if f.offset == e.offset && f.len == e.len => {}
            _ => rep.errors.push(format!(
                "I5: chunk {id} is not in the footer of pack {} where the index says",
                e.pack
            )),
        }
    }
    let Ok(mut rec) = read_record_bytes(&view.file, e.offset, e.len) else {
        rep.errors.push(format!(
            "I2: chunk {id}: cannot read its record in pack {}",
            e.pack
        ));
        return;
    };
    rep.bytes_read += u64::from(e.len);
    match RecordHeader::decode(&rec) {
        Ok(h) if h.id == id && h.record_len() == u64::from(e.len) && h.raw_len == e.raw_len => {}
        Ok(_) => {
            rep.errors.push(format!(
                "I2: chunk {id}: the record in pack {} belongs to another chunk or size",
                e.pack
            ));
            return;
        }
        Err(err) => {
            rep.errors
                .push(format!("I2: chunk {id} in pack {}: {err}", e.pack));
            return;
        }
    }
    if let Some(master) = master {
        let key = master.pack_cipher(&e.pack);
        match open_record(key.as_ref(), &mut rec).and_then(|(h, stored)| raw_plaintext(&h, stored))
        {
            Ok(raw) if hashes_to(&master.dedup_key(), &id, &raw) => {}
            Ok(_) => rep
                .errors
                .push(format!("I1: chunk {id} does not hash to its id")),
            Err(err) => rep
                .errors
                .push(format!("I1: chunk {id} in pack {}: {err}", e.pack)),
        }
    }
}
