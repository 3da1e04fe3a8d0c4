//! The end of a backup: the tree objects of the walked directory (built bottom-up, every object
//! within the appliance's maximum chunk size), then the commit point. A snapshot exists once
//! `CommitSnapshot` answered; the appliance refuses one whose trees or chunks this session
//! neither uploaded nor opened, so the trees must be uploaded (acknowledged durable) first.
//!
//! Must never commit before every batch was acknowledged, nor write the local tree cache before
//! the commit succeeded.

use coffer_proto::{v1, ChunkId, DedupKey, SnapshotId};

use super::cache::TreeCache;
use super::tree::{FileContent, TreeBuilder};
use crate::net::Session;
use crate::stages::chunk::Chunk;
use crate::stages::walk::Dir;
use crate::ClientError;

/// The tree objects of `root`, whose file `i` has content `contents[i]`, each hashed with
/// `dedup_key` and at most `max_object` bytes ([`crate::Session::max_object`]). Returns the root tree's id and every object,
/// subtrees first.
#[must_use]
pub fn build_trees(
    dedup_key: &DedupKey,
    max_object: usize,
    root: &Dir,
    contents: &[Option<FileContent>],
) -> (ChunkId, Vec<Chunk>) {
    let mut trees = Vec::new();
    let builder = TreeBuilder {
        dedup_key,
        max_object,
    };
    let root_id = builder.build(root, contents, &mut |c| trees.push(c));
    (root_id, trees)
}

/// Commits the snapshot of `path` whose root tree `root` and every tree object `trees` are
/// already stored, then keeps `trees` in the local cache for the next backup of `path`.
///
/// # Errors
/// RPC failures (the appliance refuses references this session may not make).
pub async fn commit(
    session: &Session,
    cache: &TreeCache,
    path: &str,
    root: ChunkId,
    trees: &[Chunk],
    stats: v1::SnapshotStats,
    partial: bool,
) -> Result<SnapshotId, ClientError> {
    let snap = v1::Snapshot {
        path: path.to_string(),
        root: bytes::Bytes::copy_from_slice(root.as_bytes()),
        stats: Some(stats),
        partial,
        ..v1::Snapshot::default()
    };
    let id = session.commit(snap).await?;
    cache.save(path, trees);
    Ok(id)
}
