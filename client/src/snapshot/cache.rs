//! The local tree cache: the trees of each backed-up path's latest snapshot, so that the next
//! backup (parent matching) and `snapshot diff` need not download them.
//!
//! One file per backed-up path and repository (`<keyed hash of the path>.trees`) holding every
//! tree object of its latest snapshot, written in one go after the commit and read in one go
//! before the next backup (one file per tree object cost ~2 s of inode allocation in the kernel
//! for the Linux tree). Every cached tree is checked against its id when used; losing the cache
//! only costs time.
//!
//! File format (v1): the 16 bytes `coffer-trees-v1\n`, then records of a 32-byte id, a u32
//! little-endian length and that many bytes. A truncated or foreign file is ignored from the
//! first bad record on.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;
use coffer_proto::v1::Tree;
use coffer_proto::{ChunkId, DedupKey, CHUNK_ID_LEN};

use super::tree::{check_unique, decode_checked, next_part, TreeError, MAX_TREE_PARTS};
use crate::net::Session;
use crate::stages::chunk::Chunk;
use crate::ClientError;

const MAGIC: &[u8; 16] = b"coffer-trees-v1\n";

/// Local cache of tree objects.
#[derive(Debug)]
pub struct TreeCache {
    dir: Option<PathBuf>,
    key: DedupKey,
    /// Every cached object, loaded from the cache files on first use.
    objects: Mutex<Option<HashMap<ChunkId, Bytes>>>,
}

/// Parses a cache file into `out`; stops at the first malformed record.
fn parse(b: &Bytes, out: &mut HashMap<ChunkId, Bytes>) {
    if b.len() < MAGIC.len() || &b[..MAGIC.len()] != MAGIC {
        return;
    }
    let mut at = MAGIC.len();
    while b.len() >= at + CHUNK_ID_LEN + 4 {
        let Ok(id) = ChunkId::from_slice(&b[at..at + CHUNK_ID_LEN]) else {
            return;
        };
        let len_at = at + CHUNK_ID_LEN;
        let len = u32::from_le_bytes(b[len_at..len_at + 4].try_into().expect("4 bytes")) as usize;
        let start = len_at + 4;
        if b.len() < start + len {
            return;
        }
        out.insert(id, b.slice(start..start + len));
        at = start + len;
    }
}

impl TreeCache {
    /// A cache in `dir` (none: no caching) for a repository whose dedup key is `key`.
    #[must_use]
    pub fn new(dir: Option<PathBuf>, key: DedupKey) -> Self {
        Self {
            dir,
            key,
            objects: Mutex::new(None),
        }
    }

    fn with_objects<R>(&self, f: impl FnOnce(&mut HashMap<ChunkId, Bytes>) -> R) -> R {
        let mut g = self.objects.lock().expect("tree cache lock");
        let objects = g.get_or_insert_with(|| {
            let mut m = HashMap::new();
            if let Some(entries) = self.dir.as_ref().and_then(|d| std::fs::read_dir(d).ok()) {
                for e in entries.flatten() {
                    if e.path().extension().is_some_and(|x| x == "trees") {
                        if let Ok(b) = std::fs::read(e.path()) {
                            parse(&Bytes::from(b), &mut m);
                        }
                    }
                }
            }
            m
        });
        f(objects)
    }

    /// A cached tree, if present and intact.
    #[must_use]
    pub fn get(&self, id: &ChunkId) -> Option<Bytes> {
        let b = self.with_objects(|m| m.get(id).cloned())?;
        (coffer_proto::chunk_id(&self.key, &b) == *id).then_some(b)
    }

    /// Keeps a tree for the rest of this run.
    pub fn put(&self, id: &ChunkId, bytes: Bytes) {
        self.with_objects(|m| m.insert(*id, bytes));
    }

    /// Writes `trees` (every tree object of a snapshot of `path`) as the cache file of `path`,
    /// replacing the previous one. Failures only cost time later, so they are ignored.
    pub fn save(&self, path: &str, trees: &[Chunk]) {
        let Some(dir) = &self.dir else { return };
        let name = &blake3::keyed_hash(self.key.as_bytes(), path.as_bytes()).to_hex()[..32];
        let file = dir.join(format!("{name}.trees"));
        let tmp = dir.join(format!("{name}.trees.tmp"));
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            w.write_all(MAGIC)?;
            for t in trees {
                w.write_all(t.id.as_bytes())?;
                w.write_all(
                    &u32::try_from(t.data.len())
                        .map_err(std::io::Error::other)?
                        .to_le_bytes(),
                )?;
                w.write_all(&t.data)?;
            }
            w.into_inner()
                .map_err(std::io::IntoInnerError::into_error)?;
            std::fs::rename(&tmp, &file)
        };
        if write().is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// A tree from the cache, else from the appliance (then cached).
    ///
    /// # Errors
    /// RPC failures, corrupt trees.
    pub async fn load(&self, session: &Session, id: &ChunkId) -> Result<Tree, ClientError> {
        let mut tree = Tree::default();
        let mut part_id = *id;
        for _ in 0..MAX_TREE_PARTS {
            let b = if let Some(b) = self.get(&part_id) {
                b
            } else {
                let b = session
                    .get(&[part_id])
                    .await?
                    .into_iter()
                    .next()
                    .ok_or_else(|| {
                        ClientError::Protocol(format!("GetChunks did not return tree {part_id}"))
                    })?;
                self.put(&part_id, b.clone());
                b
            };
            let part = decode_checked(&part_id, &b)?;
            let next = next_part(&part_id, &part)?;
            tree.nodes.extend(part.nodes);
            let Some(next) = next else {
                check_unique(id, &tree.nodes)?;
                return Ok(tree);
            };
            part_id = next;
        }
        Err(TreeError::TooManyParts(id.to_hex()).into())
    }
}
