//! Tree objects: a directory listing encoded as `coffer.v1.Tree` and stored as a chunk, so an
//! unchanged subtree has the same id and costs nothing to store again.

use bytes::Bytes;
use coffer_proto::v1::{Node, NodeKind, Tree};
use coffer_proto::{pack_ids, ChunkId};
use prost::Message;

use crate::chunk::Chunk;
use crate::walk::{Dir, Entry, Meta};

fn node(name: &[u8], kind: NodeKind, meta: &Meta) -> Node {
    Node {
        name: Bytes::copy_from_slice(name),
        kind: kind.into(),
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        mtime_ns: meta.mtime_ns,
        size: meta.size,
        inode: meta.inode,
        dev: meta.dev,
        ctime_ns: meta.ctime_ns,
        ..Node::default()
    }
}

/// Encodes `dir` and its subdirectories bottom-up. `file_chunks[i]` holds the chunk ids of file
/// `i` (None when it could not be read: the entry is then left out). Every tree chunk is passed
/// to `emit`; returns the id of `dir`'s tree.
pub fn build(
    dir: &Dir,
    file_chunks: &[Option<Vec<ChunkId>>],
    dedup_key: &[u8; 32],
    emit: &mut impl FnMut(Chunk),
) -> ChunkId {
    let mut nodes = Vec::with_capacity(dir.entries.len());
    for e in &dir.entries {
        match e {
            Entry::File {
                name,
                meta,
                file,
                hardlink_group,
            } => {
                let Some(chunks) = &file_chunks[*file] else {
                    continue;
                };
                let mut n = node(name, NodeKind::File, meta);
                n.chunks = pack_ids(chunks).into();
                n.hardlink_group = *hardlink_group;
                nodes.push(n);
            }
            Entry::Dir { name, meta, dir } => {
                let id = build(dir, file_chunks, dedup_key, emit);
                let mut n = node(name, NodeKind::Dir, meta);
                n.subtree = Bytes::copy_from_slice(id.as_bytes());
                nodes.push(n);
            }
            Entry::Symlink { name, meta, target } => {
                let mut n = node(name, NodeKind::Symlink, meta);
                n.symlink_target = Bytes::copy_from_slice(target);
                nodes.push(n);
            }
        }
    }
    let data = Bytes::from(Tree { nodes }.encode_to_vec());
    let id = coffer_proto::chunk_id(dedup_key, &data);
    emit(Chunk { id, data });
    id
}

/// Why a tree read back from the appliance cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("tree {0} does not decode: {1}")]
    Decode(String, String),
    #[error("tree {tree}: refusing entry name {name:?}: {why}")]
    BadName {
        tree: String,
        name: String,
        why: &'static str,
    },
    #[error("tree {0}: duplicate entry name {1:?}")]
    Duplicate(String, String),
}

/// Decodes a tree and checks every name: never empty, `.`, `..`, nor containing `/` or NUL, and
/// no duplicates (F3).
///
/// # Errors
/// [`TreeError`].
pub fn decode_checked(id: &ChunkId, bytes: &[u8]) -> Result<Tree, TreeError> {
    let t = Tree::decode(bytes).map_err(|e| TreeError::Decode(id.to_hex(), e.to_string()))?;
    let mut seen = std::collections::HashSet::new();
    for n in &t.nodes {
        let shown = String::from_utf8_lossy(&n.name).into_owned();
        let why = if n.name.is_empty() {
            Some("empty")
        } else if &n.name[..] == b"." || &n.name[..] == b".." {
            Some("a dot entry")
        } else if n.name.contains(&b'/') {
            Some("contains '/'")
        } else if n.name.contains(&0) {
            Some("contains NUL")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(TreeError::BadName {
                tree: id.to_hex(),
                name: shown,
                why,
            });
        }
        if !seen.insert(n.name.clone()) {
            return Err(TreeError::Duplicate(id.to_hex(), shown));
        }
    }
    Ok(t)
}
