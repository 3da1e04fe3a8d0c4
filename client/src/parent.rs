//! Parent snapshots and the local tree cache.
//!
//! A file whose size, mtime, ctime and inode equal those recorded in the previous snapshot of
//! the same `user@host:path` is not read again: its chunk list is taken from the parent tree.
//! Trees are kept in a local cache (one file per tree, named by its id) so that the parent's
//! trees need not be downloaded; every cached tree is checked against its id when read, and
//! losing the cache only costs time.

use std::collections::HashMap;
use std::path::PathBuf;

use coffer_proto::v1::{NodeKind, Tree};
use coffer_proto::ChunkId;

use crate::session::Session;
use crate::tree::{check_unique, decode_checked};
use crate::walk::{Dir, Entry};

/// Local cache of tree objects.
#[derive(Debug, Clone)]
pub struct TreeCache {
    dir: Option<PathBuf>,
    key: [u8; 32],
}

impl TreeCache {
    /// A cache in `dir` (none: no caching) for a repository whose dedup key is `key`.
    #[must_use]
    pub fn new(dir: Option<PathBuf>, key: [u8; 32]) -> Self {
        Self { dir, key }
    }

    fn path(&self, id: &ChunkId) -> Option<PathBuf> {
        let hex = id.to_hex();
        self.dir.as_ref().map(|d| d.join(&hex[..2]).join(hex))
    }

    /// A cached tree, if present and intact.
    #[must_use]
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let b = std::fs::read(self.path(id)?).ok()?;
        (coffer_proto::chunk_id(&self.key, &b) == *id).then_some(b)
    }

    /// Stores a tree; failures only cost time later, so they are ignored.
    pub fn put(&self, id: &ChunkId, bytes: &[u8]) {
        let Some(p) = self.path(id) else { return };
        if p.exists() {
            return;
        }
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let tmp = p.with_extension("tmp");
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }

    /// A tree from the cache, else from the appliance (then cached).
    ///
    /// # Errors
    /// RPC failures, corrupt trees.
    pub async fn load(&self, session: &Session, id: &ChunkId) -> anyhow::Result<Tree> {
        let mut tree = Tree::default();
        let mut part_id = *id;
        for _ in 0..(1 << 20) {
            let b = if let Some(b) = self.get(&part_id) {
                b
            } else {
                let b = session
                    .get(&[part_id])
                    .await?
                    .into_iter()
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("tree {part_id} missing"))?;
                self.put(&part_id, &b);
                b.to_vec()
            };
            let part = decode_checked(&part_id, &b)?;
            tree.nodes.extend(part.nodes);
            if part.next.is_empty() {
                check_unique(id, &tree.nodes)?;
                return Ok(tree);
            }
            part_id = ChunkId::from_slice(&part.next)?;
        }
        anyhow::bail!("tree {id} has too many parts (a cycle?)")
    }
}

/// For every file of `dir` unchanged since the parent tree `parent`, stores its chunk list in
/// `reuse[file]`. Returns how many files were matched.
///
/// # Errors
/// RPC failures, corrupt parent trees.
pub async fn match_parent(
    session: &Session,
    cache: &TreeCache,
    dir: &Dir,
    parent: ChunkId,
    reuse: &mut [Option<Vec<ChunkId>>],
) -> anyhow::Result<u64> {
    let tree = cache.load(session, &parent).await?;
    let by_name: HashMap<&[u8], &coffer_proto::v1::Node> =
        tree.nodes.iter().map(|n| (&n.name[..], n)).collect();
    let mut matched = 0;
    for e in &dir.entries {
        match e {
            Entry::File {
                name, meta, file, ..
            } => {
                let Some(n) = by_name.get(&name[..]) else {
                    continue;
                };
                let same = NodeKind::try_from(n.kind) == Ok(NodeKind::File)
                    && n.size == meta.size
                    && n.mtime_ns == meta.mtime_ns
                    && n.ctime_ns == meta.ctime_ns
                    && n.inode == meta.inode;
                if same {
                    if let Ok(ids) = crate::restore::node_chunk_ids(session, n).await {
                        reuse[*file] = Some(ids);
                        matched += 1;
                    }
                }
            }
            Entry::Dir { name, dir, .. } => {
                let Some(n) = by_name.get(&name[..]) else {
                    continue;
                };
                if NodeKind::try_from(n.kind) == Ok(NodeKind::Dir) {
                    if let Ok(sub) = ChunkId::from_slice(&n.subtree) {
                        matched += Box::pin(match_parent(session, cache, dir, sub, reuse)).await?;
                    }
                }
            }
            Entry::Symlink { .. } => {}
        }
    }
    Ok(matched)
}
