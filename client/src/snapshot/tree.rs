//! Tree objects: a directory listing encoded as `coffer.v1.Tree` and stored as a chunk, so an
//! unchanged subtree has the same id and costs nothing to store again.
//!
//! Every object must fit in one chunk (the appliance's maximum chunk size): a listing that does
//! not is split into parts chained by `Tree.next`, and a file with more chunk ids than fit in a
//! tree keeps them in "list chunks" named by `Node.chunk_lists`.

use bytes::Bytes;
use coffer_proto::v1::{Node, NodeKind, Tree};
use coffer_proto::{pack_ids, ChunkId, DedupKey, CHUNK_ID_LEN};
use prost::Message;

use crate::stages::chunk::{Chunk, ChunkKind};
use crate::stages::walk::{Dir, Entry, Meta};

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

/// A file's content as backed up: the bytes read (which may differ from the size the walk saw
/// when the file changed meanwhile) and its chunk ids, or the bundle and offset holding it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileContent {
    pub size: u64,
    pub chunks: Vec<ChunkId>,
    pub bundle: Option<(ChunkId, u64)>,
}

/// Builds trees within `max_object` bytes each.
pub struct TreeBuilder<'a> {
    pub dedup_key: &'a DedupKey,
    /// Largest object the appliance accepts (its maximum chunk size).
    pub max_object: usize,
}

impl TreeBuilder<'_> {
    fn object(&self, data: Vec<u8>, kind: ChunkKind, emit: &mut impl FnMut(Chunk)) -> ChunkId {
        let data = Bytes::from(data);
        let id = coffer_proto::chunk_id(self.dedup_key, &data);
        emit(Chunk { id, data, kind });
        id
    }

    /// Puts a file's chunk list into the node, indirectly when it would not fit a tree part.
    fn set_chunks(&self, n: &mut Node, chunks: &[ChunkId], emit: &mut impl FnMut(Chunk)) {
        let direct_max = self.max_object / 4 / CHUNK_ID_LEN;
        if chunks.len() <= direct_max {
            n.chunks = pack_ids(chunks).into();
            return;
        }
        let per_list = (self.max_object / 2 / CHUNK_ID_LEN).max(1);
        let lists: Vec<ChunkId> = chunks
            .chunks(per_list)
            .map(|part| self.object(pack_ids(part), ChunkKind::List, emit))
            .collect();
        n.chunk_lists = pack_ids(&lists).into();
    }

    /// Encodes `dir` and its subdirectories bottom-up. `files[i]` holds the content of file `i`
    /// (None when it could not be read: the entry is then left out). Every object is
    /// passed to `emit`; returns the id of `dir`'s tree (its first part).
    pub fn build(
        &self,
        dir: &Dir,
        files: &[Option<FileContent>],
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
                    let Some(content) = &files[*file] else {
                        continue;
                    };
                    let mut n = node(name, NodeKind::File, meta);
                    n.size = content.size;
                    if let Some((id, offset)) = content.bundle {
                        n.bundle = Bytes::copy_from_slice(id.as_bytes());
                        n.bundle_offset = offset;
                    } else {
                        self.set_chunks(&mut n, &content.chunks, emit);
                    }
                    n.hardlink_group = *hardlink_group;
                    nodes.push(n);
                }
                Entry::Dir { name, meta, dir } => {
                    let id = self.build(dir, files, emit);
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
        // Split into parts of at most max_object bytes (a part's `next` field takes 34 bytes).
        let budget = self.max_object.saturating_sub(64).max(1);
        let mut parts: Vec<Vec<Node>> = vec![Vec::new()];
        let mut size = 0;
        for n in nodes {
            let len = n.encoded_len() + 8;
            if size + len > budget && !parts.last().expect("one part").is_empty() {
                parts.push(Vec::new());
                size = 0;
            }
            size += len;
            parts.last_mut().expect("one part").push(n);
        }
        let mut next = Bytes::new();
        let mut id = ChunkId::default();
        for part in parts.into_iter().rev() {
            id = self.object(
                Tree { nodes: part, next }.encode_to_vec(),
                ChunkKind::Tree,
                emit,
            );
            next = Bytes::copy_from_slice(id.as_bytes());
        }
        id
    }
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
    #[error("tree {tree}: malformed {what}; the snapshot is damaged, restore another one")]
    Malformed { tree: String, what: &'static str },
    #[error("a file entry has a malformed {0}; the snapshot is damaged, restore another one")]
    BadFileEntry(&'static str),
    #[error("tree {0} has more than {MAX_TREE_PARTS} parts (a cycle?); the snapshot is damaged")]
    TooManyParts(String),
}

/// Most parts one listing may have (a cycle of parts must not loop forever).
pub const MAX_TREE_PARTS: usize = 1 << 20;

/// The id of the directory `n` (an entry of tree `tree`) points to.
///
/// # Errors
/// [`TreeError::Malformed`].
pub fn subtree_of(tree: &ChunkId, n: &Node) -> Result<ChunkId, TreeError> {
    ChunkId::from_slice(&n.subtree).map_err(|_| TreeError::Malformed {
        tree: tree.to_hex(),
        what: "subtree id",
    })
}

/// The id of the next part of the listing whose part `id` is `t`, if there is one.
///
/// # Errors
/// [`TreeError::Malformed`].
pub fn next_part(id: &ChunkId, t: &Tree) -> Result<Option<ChunkId>, TreeError> {
    if t.next.is_empty() {
        return Ok(None);
    }
    ChunkId::from_slice(&t.next)
        .map(Some)
        .map_err(|_| TreeError::Malformed {
            tree: id.to_hex(),
            what: "next-part id",
        })
}

/// Decodes one tree part and checks every name: never empty, `.`, `..`, nor containing `/` or
/// NUL (F3). Uniqueness across parts is checked by [`check_unique`].
///
/// # Errors
/// [`TreeError`].
pub fn decode_checked(id: &ChunkId, bytes: &[u8]) -> Result<Tree, TreeError> {
    let t = Tree::decode(bytes).map_err(|e| TreeError::Decode(id.to_hex(), e.to_string()))?;
    for n in &t.nodes {
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
                name: String::from_utf8_lossy(&n.name).into_owned(),
                why,
            });
        }
    }
    Ok(t)
}

/// Refuses a listing (all parts) in which a name appears twice (F3).
///
/// # Errors
/// [`TreeError::Duplicate`].
pub fn check_unique(id: &ChunkId, nodes: &[Node]) -> Result<(), TreeError> {
    let mut seen = std::collections::HashSet::with_capacity(nodes.len());
    for n in nodes {
        if !seen.insert(&n.name[..]) {
            return Err(TreeError::Duplicate(
                id.to_hex(),
                String::from_utf8_lossy(&n.name).into_owned(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::walk::{Dir, Entry, Meta};
    use std::collections::HashMap;

    #[test]
    fn large_listings_and_chunk_lists_split_within_the_object_limit() {
        let key = DedupKey::from_bytes([3u8; 32]);
        let max = 2048;
        let many: Vec<ChunkId> = (0..500u32)
            .map(|i| coffer_proto::chunk_id(&key, &i.to_le_bytes()))
            .collect();
        let mut entries = vec![Entry::File {
            name: b"big".to_vec(),
            meta: Meta::default(),
            file: 0,
            hardlink_group: 0,
        }];
        for i in 0..200 {
            entries.push(Entry::File {
                name: format!("f{i:03}").into_bytes(),
                meta: Meta::default(),
                file: 1,
                hardlink_group: 0,
            });
        }
        let dir = Dir {
            meta: Meta::default(),
            entries,
        };
        let files = vec![
            Some(FileContent {
                size: 1,
                chunks: many.clone(),
                bundle: None,
            }),
            Some(FileContent {
                size: 1,
                chunks: vec![many[0]],
                bundle: None,
            }),
        ];
        let mut objects: HashMap<ChunkId, Bytes> = HashMap::new();
        let root = TreeBuilder {
            dedup_key: &key,
            max_object: max,
        }
        .build(&dir, &files, &mut |c| {
            assert!(c.data.len() <= max, "object of {} bytes", c.data.len());
            assert_eq!(coffer_proto::chunk_id(&key, &c.data), c.id);
            objects.insert(c.id, c.data);
        });
        // Follow the parts.
        let mut nodes = Vec::new();
        let mut part = root;
        let mut parts = 0;
        loop {
            let t = decode_checked(&part, &objects[&part]).unwrap();
            parts += 1;
            nodes.extend(t.nodes);
            if t.next.is_empty() {
                break;
            }
            part = ChunkId::from_slice(&t.next).unwrap();
        }
        assert!(parts > 1, "the listing must have been split");
        assert_eq!(nodes.len(), 201);
        check_unique(&root, &nodes).unwrap();
        let big = &nodes[0];
        assert!(big.chunks.is_empty() && !big.chunk_lists.is_empty());
        let mut ids = Vec::new();
        for l in coffer_proto::unpack_ids(&big.chunk_lists, usize::MAX).unwrap() {
            ids.extend(coffer_proto::unpack_ids(&objects[&l], usize::MAX).unwrap());
        }
        assert_eq!(ids, many);
    }
}
