//! `coffer snapshot diff A B`: what changed between two snapshots, computed from their trees.
//! Subtrees with the same id are identical and skipped without being read.

use std::collections::BTreeMap;

use coffer_proto::v1::{Node, NodeKind};
use coffer_proto::ChunkId;

use super::cache::TreeCache;
use super::tree::subtree_of;
use crate::net::Session;
use crate::ClientError;

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    /// `+` added, `-` removed, `M` content changed, `m` metadata only, `T` type changed.
    pub kind: char,
    pub path: String,
}

/// Differences from tree `a` to tree `b`, with paths relative to their roots.
///
/// # Errors
/// RPC failures, corrupt trees.
pub async fn diff(
    session: &Session,
    cache: &TreeCache,
    a: ChunkId,
    b: ChunkId,
) -> Result<Vec<Change>, ClientError> {
    let mut out = Vec::new();
    walk(session, cache, a, b, String::new(), &mut out).await?;
    Ok(out)
}

async fn list_all(
    session: &Session,
    cache: &TreeCache,
    t: ChunkId,
    prefix: &str,
    sign: char,
    out: &mut Vec<Change>,
) -> Result<(), ClientError> {
    for n in cache.load(session, &t).await?.nodes {
        let p = format!("{prefix}/{}", String::from_utf8_lossy(&n.name));
        out.push(Change {
            kind: sign,
            path: p.clone(),
        });
        if NodeKind::try_from(n.kind) == Ok(NodeKind::Dir) {
            let sub = subtree_of(&t, &n)?;
            Box::pin(list_all(session, cache, sub, &p, sign, out)).await?;
        }
    }
    Ok(())
}

async fn walk(
    session: &Session,
    cache: &TreeCache,
    a: ChunkId,
    b: ChunkId,
    prefix: String,
    out: &mut Vec<Change>,
) -> Result<(), ClientError> {
    if a == b {
        return Ok(());
    }
    let ta = cache.load(session, &a).await?;
    let tb = cache.load(session, &b).await?;
    let mut names: BTreeMap<&[u8], (Option<&Node>, Option<&Node>)> = BTreeMap::new();
    for n in &ta.nodes {
        names.entry(&n.name[..]).or_default().0 = Some(n);
    }
    for n in &tb.nodes {
        names.entry(&n.name[..]).or_default().1 = Some(n);
    }
    for (name, pair) in names {
        let p = format!("{prefix}/{}", String::from_utf8_lossy(name));
        let is_dir = |n: &Node| NodeKind::try_from(n.kind) == Ok(NodeKind::Dir);
        match pair {
            (None, Some(nb)) => {
                out.push(Change {
                    kind: '+',
                    path: p.clone(),
                });
                if is_dir(nb) {
                    Box::pin(list_all(session, cache, subtree_of(&b, nb)?, &p, '+', out)).await?;
                }
            }
            (Some(na), None) => {
                out.push(Change {
                    kind: '-',
                    path: p.clone(),
                });
                if is_dir(na) {
                    Box::pin(list_all(session, cache, subtree_of(&a, na)?, &p, '-', out)).await?;
                }
            }
            (Some(na), Some(nb)) => {
                if na.kind != nb.kind {
                    out.push(Change { kind: 'T', path: p });
                } else if is_dir(na) {
                    let (sa, sb) = (subtree_of(&a, na)?, subtree_of(&b, nb)?);
                    Box::pin(walk(session, cache, sa, sb, p, out)).await?;
                } else if na.chunks != nb.chunks
                    || na.chunk_lists != nb.chunk_lists
                    || na.bundle != nb.bundle
                    || na.bundle_offset != nb.bundle_offset
                    || na.symlink_target != nb.symlink_target
                {
                    out.push(Change { kind: 'M', path: p });
                } else if na.mode != nb.mode
                    || na.mtime_ns != nb.mtime_ns
                    || na.uid != nb.uid
                    || na.gid != nb.gid
                {
                    out.push(Change { kind: 'm', path: p });
                }
            }
            (None, None) => {}
        }
    }
    Ok(())
}
