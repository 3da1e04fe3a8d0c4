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
    /// Chunks whose records are missing, cut or fail to authenticate (C8), by shard.
    pub damaged: Vec<(ShardId, ChunkId)>,
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
    if let Some(storage) = crate::pack::store::s3::StorageConfig::load(paths)
        .map_err(|e| RepoError::Invalid(e.to_string()))?
    {
        // Packs dropped from the local cache are checked from the bucket: fetched first (the
        // next start trims the cache again). Unreachable, they would read as missing.
        let (n, bytes) = crate::pack::store::s3::fetch_missing_packs(paths, &storage)
            .map_err(|e| RepoError::Invalid(format!("verify needs the object store: {e}")))?;
        if n > 0 {
            rep.warnings.push(format!(
                "fetched {n} packs ({bytes} bytes) from {} to check them",
                storage.url
            ));
        }
    }
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
        for r in crate::index::replaced(&idx)? {
            rep.warnings.push(format!(
                "S1: chunk {} ({shard}): at {} an upload of a different sealed envelope replaced \
                 its record (pack {}, offset {}, kept there until compaction); one of the two \
                 uploads was poisoned by a keyring member. Readers check the keyed id, so a \
                 restore never writes the poisoned one",
                r.id,
                coffer_proto::when::format_us(r.time_us),
                r.old.pack,
                r.old.offset
            ));
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

/// Records `damaged` in the shard indexes so that the appliance answers them missing and the
/// next backup holding their data replaces them (C8). Returns how many are listed now.
///
/// # Errors
/// When an index cannot be opened for writing (a running appliance holds it: it marks damaged
/// records itself when it reads them).
pub fn mark_damaged(
    paths: &RepoPaths,
    cfg: &RepoConfig,
    damaged: &[(ShardId, ChunkId)],
) -> Result<usize, RepoError> {
    let mut total = 0;
    for shard in cfg.shard_ids() {
        let mine: Vec<ChunkId> = damaged
            .iter()
            .filter(|(s, _)| *s == shard)
            .map(|(_, id)| *id)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let idx = RocksIndex::open(&paths.shard_index(shard), OpenMode::Existing, 8 << 20)?;
        let mut set = crate::index::damaged(&idx)?;
        set.extend(mine);
        crate::index::set_damaged(&idx, &set)?;
        total += set.len();
    }
    Ok(total)
}

/// Reads a stored chunk's plaintext offline (verify's walk of the snapshots).
fn read_plain(
    idx: &[RocksIndex],
    paths: &RepoPaths,
    cfg: &RepoConfig,
    master: &MasterKey,
    id: &ChunkId,
) -> Result<Vec<u8>, String> {
    let shard = ShardId::for_chunk(id, cfg.shards);
    let e = idx[usize::from(shard.0)]
        .get_many(std::slice::from_ref(id))
        .map_err(|e| e.to_string())?
        .pop()
        .flatten()
        .ok_or_else(|| format!("chunk {id} is not indexed"))?;
    let file = File::open(paths.pack(&e.pack)).map_err(|x| format!("pack {}: {x}", e.pack))?;
    let mut rec = read_record_bytes(&file, e.offset, e.len).map_err(|x| x.to_string())?;
    let key = master.pack_cipher(&e.pack);
    let (h, stored) = open_record(key.as_ref(), &mut rec).map_err(|x| x.to_string())?;
    raw_plaintext(&h, stored).map_err(|x| x.to_string())
}

/// Every snapshot and file that references a damaged chunk: one line each, `snapshot <id>
/// (<identity> <path>, <time>): <file>`. Needs the catalog (a stopped appliance).
///
/// # Errors
/// The catalog or an index cannot be opened.
pub fn affected(
    paths: &RepoPaths,
    cfg: &RepoConfig,
    master: &MasterKey,
    damaged: &[ChunkId],
) -> Result<Vec<String>, String> {
    let damaged: HashSet<ChunkId> = damaged.iter().copied().collect();
    let catalog =
        crate::catalog::Catalog::open(&paths.catalog(), false).map_err(|e| e.to_string())?;
    let snapshots = catalog.snapshots().map_err(|e| e.to_string())?;
    drop(catalog);
    let idx = cfg
        .shard_ids()
        .map(|s| RocksIndex::open(&paths.shard_index(s), OpenMode::ReadOnly, 16 << 20))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let mut walk = TreeWalk {
        idx: &idx,
        paths,
        cfg,
        master,
        damaged: &damaged,
        memo: HashMap::new(),
    };
    let mut out = Vec::new();
    for s in snapshots {
        let Ok(root) = ChunkId::from_slice(&s.root) else {
            continue;
        };
        for file in walk.tree(&root) {
            out.push(format!(
                "snapshot {} ({} {}, {}): {}",
                &hex::encode(&s.id)[..16.min(s.id.len() * 2)],
                s.identity,
                s.path,
                coffer_proto::when::format_us(s.time_us),
                if file.is_empty() { "/" } else { &file }
            ));
        }
    }
    Ok(out)
}

/// A walk of snapshot trees for paths that reference damaged chunks; subtrees shared between
/// snapshots are walked once.
struct TreeWalk<'a> {
    idx: &'a [RocksIndex],
    paths: &'a RepoPaths,
    cfg: &'a RepoConfig,
    master: &'a MasterKey,
    damaged: &'a HashSet<ChunkId>,
    memo: HashMap<ChunkId, Vec<String>>,
}

impl TreeWalk<'_> {
    /// Paths under the tree `id` (relative, `/`-separated) that reference a damaged chunk; the
    /// empty path when the tree object itself is damaged or unreadable.
    fn tree(&mut self, id: &ChunkId) -> Vec<String> {
        use prost::Message as _;
        if let Some(m) = self.memo.get(id) {
            return m.clone();
        }
        if self.cfg.mode == crate::repo::Mode::Sealed {
            let out = if self.sealed_reaches_damage(*id) {
                vec!["(sealed: file names are known only to the keyring's members)".to_string()]
            } else {
                Vec::new()
            };
            self.memo.insert(*id, out.clone());
            return out;
        }
        let mut out = Vec::new();
        let mut next = Some(*id);
        while let Some(t) = next.take() {
            let tree = if self.damaged.contains(&t) {
                None
            } else {
                read_plain(self.idx, self.paths, self.cfg, self.master, &t)
                    .ok()
                    .and_then(|b| coffer_proto::v1::Tree::decode(&b[..]).ok())
            };
            let Some(tree) = tree else {
                out.push(String::new());
                break;
            };
            for n in &tree.nodes {
                let name = String::from_utf8_lossy(&n.name).into_owned();
                if let Ok(sub) = ChunkId::from_slice(&n.subtree) {
                    for p in self.tree(&sub) {
                        out.push(if p.is_empty() {
                            format!("{name}/")
                        } else {
                            format!("{name}/{p}")
                        });
                    }
                    continue;
                }
                if self.file_damaged(n) {
                    out.push(name);
                }
            }
            next = ChunkId::from_slice(&tree.next).ok();
        }
        self.memo.insert(*id, out.clone());
        out
    }

    /// Sealed mode: whether anything the envelopes below `root` declare is damaged (or a tree
    /// there cannot be read). Names are sealed: only the snapshot can be named.
    fn sealed_reaches_damage(&self, root: ChunkId) -> bool {
        let mut seen = HashSet::new();
        let mut todo = vec![root];
        while let Some(t) = todo.pop() {
            if !seen.insert(t) {
                continue;
            }
            if self.damaged.contains(&t) {
                return true;
            }
            let Some(refs) = read_plain(self.idx, self.paths, self.cfg, self.master, &t)
                .ok()
                .and_then(|b| coffer_proto::sealed::decode_refs(&b).ok().map(|r| r.0))
            else {
                return true;
            };
            if refs
                .leaves
                .iter()
                .chain(&refs.lists)
                .any(|l| self.damaged.contains(l))
            {
                return true;
            }
            for l in &refs.lists {
                let inner = read_plain(self.idx, self.paths, self.cfg, self.master, l)
                    .ok()
                    .and_then(|b| coffer_proto::sealed::decode_refs(&b).ok().map(|r| r.0));
                match inner {
                    Some(r) if !r.all().any(|x| self.damaged.contains(x)) => {}
                    _ => return true,
                }
            }
            todo.extend(refs.trees);
        }
        false
    }

    fn file_damaged(&self, n: &coffer_proto::v1::Node) -> bool {
        let ids = |b: &bytes::Bytes| coffer_proto::unpack_ids(b, usize::MAX).unwrap_or_default();
        let mut refs = ids(&n.chunks);
        refs.extend(ChunkId::from_slice(&n.bundle));
        for list in ids(&n.chunk_lists) {
            refs.push(list);
            if !self.damaged.contains(&list) {
                if let Ok(b) = read_plain(self.idx, self.paths, self.cfg, self.master, &list) {
                    refs.extend(coffer_proto::unpack_ids(&b, usize::MAX).unwrap_or_default());
                }
            }
        }
        refs.iter().any(|r| self.damaged.contains(r))
    }
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
        rep.damaged.push((shard, id));
        return;
    };
    if e.offset + u64::from(e.len) > view.len || (e.len as usize) < RECORD_HEADER_LEN {
        rep.errors
            .push(format!("I2: chunk {id} points outside pack {}", e.pack));
        rep.damaged.push((shard, id));
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
        rep.damaged.push((shard, id));
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
            rep.damaged.push((shard, id));
            return;
        }
        Err(err) => {
            rep.errors
                .push(format!("I2: chunk {id} in pack {}: {err}", e.pack));
            rep.damaged.push((shard, id));
            return;
        }
    }
    if let Some(master) = master {
        let key = master.pack_cipher(&e.pack);
        let sealed = e.flags & crate::pack::format::FLAG_SEALED != 0;
        match open_record(key.as_ref(), &mut rec).and_then(|(h, stored)| raw_plaintext(&h, stored))
        {
            // A sealed envelope authenticated under the pack key is all the appliance can
            // check: its id is keyed within a client keyring (readers check it).
            Ok(raw) if sealed && coffer_proto::sealed::decode_refs(&raw).is_ok() => {}
            Ok(raw) if !sealed && hashes_to(&master.dedup_key(), &id, &raw) => {}
            Ok(_) => {
                rep.errors
                    .push(format!("I1: chunk {id} does not hash to its id"));
                rep.damaged.push((shard, id));
            }
            Err(err) => {
                rep.errors
                    .push(format!("I1: chunk {id} in pack {}: {err}", e.pack));
                rep.damaged.push((shard, id));
            }
        }
    }
}
