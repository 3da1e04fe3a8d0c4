//! Reading trees back from the appliance: every part of a listing, checked ([`decode_checked`],
//! [`check_unique`]), many listings per call; and a file entry's chunk ids, following its list
//! chunks. Used by restore, `ls` and parent matching; nothing here is cached (see
//! [`super::cache`] for that).

use coffer_proto::v1::{Node, Tree};
use coffer_proto::{unpack_ids, ChunkId};

use super::tree::{check_unique, decode_checked, next_part, TreeError, MAX_TREE_PARTS};
use crate::net::Session;
use crate::ClientError;

/// Fetches and checks one tree.
///
/// # Errors
/// RPC failures, corrupt or malicious trees.
pub async fn fetch_tree(session: &Session, id: &ChunkId) -> Result<Tree, ClientError> {
    Ok(fetch_trees(session, &[*id])
        .await?
        .pop()
        .expect("one tree asked, one returned"))
}

/// Fetches and checks many trees (all their parts), batching each round of parts in one call.
///
/// # Errors
/// RPC failures, corrupt or malicious trees.
pub async fn fetch_trees(session: &Session, ids: &[ChunkId]) -> Result<Vec<Tree>, ClientError> {
    let bytes = session.get(ids).await?;
    let mut trees: Vec<Tree> = ids
        .iter()
        .zip(bytes)
        .map(|(id, b)| decode_checked(id, &b))
        .collect::<Result<_, _>>()?;
    let mut pending: Vec<(usize, ChunkId)> = Vec::new();
    for (i, (id, t)) in ids.iter().zip(&trees).enumerate() {
        if let Some(next) = next_part(id, t)? {
            pending.push((i, next));
        }
    }
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        if rounds > MAX_TREE_PARTS {
            let (i, _) = pending[0];
            return Err(TreeError::TooManyParts(ids[i].to_hex()).into());
        }
        let part_ids: Vec<ChunkId> = pending.iter().map(|p| p.1).collect();
        let parts = session.get(&part_ids).await?;
        let mut again = Vec::new();
        for ((i, pid), b) in pending.into_iter().zip(parts) {
            let part = decode_checked(&pid, &b)?;
            if let Some(next) = next_part(&pid, &part)? {
                again.push((i, next));
            }
            trees[i].nodes.extend(part.nodes);
        }
        pending = again;
    }
    for (id, t) in ids.iter().zip(&mut trees) {
        check_unique(id, &t.nodes)?;
        t.next = bytes::Bytes::new();
    }
    Ok(trees)
}

/// The chunk ids of a file node, following its list chunks when it has them; for a bundled file,
/// its bundle.
///
/// # Errors
/// RPC failures, malformed lists ([`TreeError::BadFileEntry`]).
pub async fn node_chunk_ids(session: &Session, n: &Node) -> Result<Vec<ChunkId>, ClientError> {
    if !n.bundle.is_empty() {
        let bundle =
            ChunkId::from_slice(&n.bundle).map_err(|_| TreeError::BadFileEntry("bundle id"))?;
        return Ok(vec![bundle]);
    }
    let bad_list = |_| TreeError::BadFileEntry("chunk list");
    if n.chunk_lists.is_empty() {
        return Ok(unpack_ids(&n.chunks, usize::MAX).map_err(bad_list)?);
    }
    let lists = unpack_ids(&n.chunk_lists, usize::MAX).map_err(bad_list)?;
    let mut out = Vec::new();
    for l in session.get(&lists).await? {
        out.extend(unpack_ids(&l, usize::MAX).map_err(bad_list)?);
    }
    Ok(out)
}
