//! Reachability over trees: what a snapshot reaches, and whether a new snapshot references only
//! what its session may reference.
//!
//! Owns: the level-by-level walk from a root tree (commit checks, opened snapshots, the GC mark:
//! [`Marker`]), its bounds, the cache of recently walked snapshots and the walk permits. Each walk runs
//! on one thread of tokio's blocking pool from start to end (at most [`WALKS`] walks at once, one
//! per account), never on the network threads; chunks are read through [`Shards`].
//!
//! Must never write anything: it reads chunks and answers sets. It never decides access itself:
//! the caller passes what a session knows as a [`Known`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use coffer_proto::{sealed, unpack_ids, v1, ChunkId};
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApplianceError;
use crate::shard::{Shards, StoredChunk};

/// Tree walks (commit checks, snapshot opens) running at once, appliance-wide.
pub const WALKS: usize = 4;
/// Chunks a walk reads at once, whatever a client uploaded: at most 1,024 × the maximum chunk
/// size of tree objects (real trees are a few KiB: the Linux tree's levels take one or two
/// fetches; 128 per fetch made opening it ~8 % slower), and 32 list chunks (8 MiB).
const TREES_PER_FETCH: usize = 1024;
const LISTS_PER_FETCH: usize = 32;
/// Snapshots whose reachable sets stay cached (a Linux-tree snapshot's set is ~5 MB).
const CACHE: usize = 8;
/// Most trees and chunks one snapshot may reach (a bound on what a malicious tree can cost).
pub const MAX_REACH: usize = 50_000_000;

/// Everything reachable from a snapshot root: tree objects apart from leaves (file chunks, list
/// chunks and the ids they hold, bundles). Kept apart because only a *tree* of an opened snapshot
/// may stand for a subtree that a commit need not walk again: a leaf whose bytes happen to decode
/// as a tree must be walked (and its references checked) like any other.
#[derive(Debug, Default)]
pub struct Reach {
    pub trees: HashSet<ChunkId>,
    pub leaves: HashSet<ChunkId>,
}

impl Reach {
    #[must_use]
    pub fn len(&self) -> usize {
        self.trees.len() + self.leaves.len()
    }

    #[must_use]
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.trees.contains(id) || self.leaves.contains(id)
    }
}

/// What a walk may read: a session's uploaded, proved and opened chunks.
pub trait Known: Send + Sync {
    /// Whether the walk may read and reference `id`.
    fn knows(&self, id: &ChunkId) -> bool;
    /// Whether `id` is a tree of an already opened (and so already walked) snapshot.
    fn opened_tree(&self, id: &ChunkId) -> bool;
}

/// What a walk from a snapshot root found.
#[derive(Debug, Default)]
pub struct Walk {
    pub reach: Reach,
    /// Whether some subtree was not descended into (it belongs to an opened snapshot): `reach`
    /// is then not the whole reachable set.
    pub skipped: bool,
}

/// Held while a walk runs: the account's turn and one of the appliance's walk slots.
#[derive(Debug)]
pub struct Permit {
    _mine: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

/// The walker of one running appliance.
#[derive(Debug)]
pub struct Walker {
    shards: Shards,
    /// Reachable sets of recently opened or committed snapshots, most recent last. Keyed by
    /// root: snapshots of the same tree share one set.
    cache: Mutex<Vec<(ChunkId, Arc<Reach>)>>,
    /// Tree walks running at once, appliance-wide.
    walks: Arc<Semaphore>,
    /// One tree walk at a time per account.
    per_account: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// One walk's gate and bound, checked at every insertion, and whether its caller still waits.
struct Rules {
    known: Option<Arc<dyn Known>>,
    stop: Arc<AtomicBool>,
}

fn bad(e: String) -> ApplianceError {
    ApplianceError::FailedPrecondition(e)
}

impl Rules {
    fn running(&self) -> Result<(), ApplianceError> {
        if self.stop.load(Ordering::Relaxed) {
            Err(ApplianceError::Unavailable(
                "tree walk abandoned: its caller went away".into(),
            ))
        } else {
            Ok(())
        }
    }

    fn knows(&self, id: &ChunkId) -> Result<(), ApplianceError> {
        if self.known.as_ref().is_none_or(|k| k.knows(id)) {
            Ok(())
        } else {
            Err(bad(format!(
                "it references chunk {id}, which this session neither uploaded, proved nor \
                 opened; upload it or open the snapshot it comes from"
            )))
        }
    }

    fn opened_tree(&self, id: &ChunkId) -> bool {
        self.known.as_ref().is_some_and(|k| k.opened_tree(id))
    }

    fn bounded(w: &Walk) -> Result<(), ApplianceError> {
        if w.reach.len() > MAX_REACH {
            Err(bad(format!(
                "a snapshot may reach at most {MAX_REACH} chunks"
            )))
        } else {
            Ok(())
        }
    }

    /// Admits the trees of one level: skips opened ones, checks and records the rest; answers
    /// the trees to read.
    fn admit_trees(
        &self,
        w: &mut Walk,
        level: Vec<ChunkId>,
    ) -> Result<Vec<ChunkId>, ApplianceError> {
        let mut todo = Vec::new();
        for id in level {
            if self.opened_tree(&id) {
                w.skipped = true;
                continue;
            }
            self.knows(&id)?;
            if w.reach.trees.insert(id) {
                Self::bounded(w)?;
                todo.push(id);
            }
        }
        Ok(todo)
    }

    /// Records one leaf; answers whether it is new.
    fn admit_leaf(&self, w: &mut Walk, id: ChunkId) -> Result<bool, ApplianceError> {
        self.knows(&id)?;
        let new = w.reach.leaves.insert(id);
        if new {
            Self::bounded(w)?;
        }
        Ok(new)
    }

    /// Decodes read trees and records their leaves; answers the next level's trees and the
    /// list chunks to read.
    fn add_trees(
        &self,
        w: &mut Walk,
        chunks: &[StoredChunk],
    ) -> Result<(Vec<ChunkId>, Vec<ChunkId>), ApplianceError> {
        let (mut next, mut lists) = (Vec::new(), Vec::new());
        for r in tree_refs(chunks)? {
            next.extend(r.trees);
            for id in r.leaves {
                self.admit_leaf(w, id)?;
            }
            for id in r.lists {
                if self.admit_leaf(w, id)? {
                    lists.push(id);
                }
            }
        }
        Ok((next, lists))
    }

    fn add_lists(&self, w: &mut Walk, chunks: &[StoredChunk]) -> Result<(), ApplianceError> {
        for id in list_refs(chunks)? {
            self.admit_leaf(w, id)?;
        }
        Ok(())
    }
}

impl Walker {
    #[must_use]
    pub fn new(shards: Shards) -> Self {
        Self {
            shards,
            cache: Mutex::new(Vec::new()),
            walks: Arc::new(Semaphore::new(WALKS)),
            per_account: Mutex::new(HashMap::new()),
        }
    }

    /// Walks the trees from `root` level by level.
    ///
    /// With `known` (the commit check) the walk reads only chunks the session knows: a subtree
    /// of a snapshot it opened is not descended into, and any other chunk it does not know ends
    /// the walk *before that chunk is read* — so nothing of someone else's data is decoded or
    /// quoted, and the answer is the same whether or not the chunk is stored (the disclosure rule
    /// of `error.rs`). Memory is bounded by [`MAX_REACH`], checked at every insertion, and by the
    /// chunks read at once ([`TREES_PER_FETCH`], [`LISTS_PER_FETCH`]).
    ///
    /// # Errors
    /// `FailedPrecondition` naming the first reference the session may not make, or a chunk
    /// that is not a tree object; read errors.
    pub async fn walk(
        &self,
        root: ChunkId,
        known: Option<Arc<dyn Known>>,
    ) -> Result<Walk, ApplianceError> {
        // The whole walk runs on one blocking-pool thread (decoding, checks and the sets all
        // stay there, so the sets grow in one thread's heap); its reads are the shards' async
        // calls, driven there with `block_on`. A caller that goes away stops it at its next step.
        let shards = self.shards.clone();
        let rt = tokio::runtime::Handle::current();
        let stop = Arc::new(AtomicBool::new(false));
        let _guard = StopOnDrop(stop.clone());
        let rules = Rules { known, stop };
        tokio::task::spawn_blocking(move || rt.block_on(walk_from(&shards, root, &rules)))
            .await
            .map_err(|e| ApplianceError::Internal(format!("tree walk: {e}")))?
    }

    /// Waits for this account's turn to walk trees (one walk per account at a time) and for one
    /// of the appliance's walk slots: a flood of commits costs its sender, not everyone.
    ///
    /// # Errors
    /// `Unavailable` while shutting down.
    pub async fn permit(&self, identity: &str) -> Result<Permit, ApplianceError> {
        let mine = {
            let mut m = self
                .per_account
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if m.len() > 4096 {
                // Forget accounts with no walk in progress (deleted ones among them).
                m.retain(|_, s| Arc::strong_count(s) > 1);
            }
            m.entry(identity.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(1)))
                .clone()
        };
        let closed = |_| ApplianceError::Unavailable("the appliance is shutting down".into());
        let mine = mine.acquire_owned().await.map_err(closed)?;
        let global = self.walks.clone().acquire_owned().await.map_err(closed)?;
        Ok(Permit {
            _mine: mine,
            _global: global,
        })
    }

    fn cached(&self, root: &ChunkId) -> Option<Arc<Reach>> {
        let c = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        c.iter().find(|(r, _)| r == root).map(|(_, r)| r.clone())
    }

    /// Keeps the reachable set of `root` for the next opens (a commit's complete walk).
    pub fn remember(&self, root: ChunkId, reach: Arc<Reach>) {
        let mut c = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        c.retain(|(r, _)| *r != root);
        c.push((root, reach));
        if c.len() > CACHE {
            c.remove(0);
        }
    }

    /// Everything reachable from snapshot `snap` (cached by root).
    ///
    /// # Errors
    /// A root that is not an id; read and decoding errors.
    pub async fn snapshot(&self, snap: &v1::Snapshot) -> Result<Arc<Reach>, ApplianceError> {
        let root = ChunkId::from_slice(&snap.root)
            .map_err(|e| ApplianceError::Internal(format!("a stored snapshot's root: {e}")))?;
        if let Some(r) = self.cached(&root) {
            return Ok(r);
        }
        let w = self.walk(root, None).await?;
        let all = Arc::new(w.reach);
        self.remember(root, all.clone());
        Ok(all)
    }
}

/// Sets its flag when the caller of a walk goes away.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The walk from `root`, level by level (see [`Walker::walk`]).
async fn walk_from(shards: &Shards, root: ChunkId, rules: &Rules) -> Result<Walk, ApplianceError> {
    let mut w = Walk::default();
    let mut level = vec![root];
    while !level.is_empty() {
        let todo = rules.admit_trees(&mut w, level)?;
        let (mut next, mut lists) = (Vec::new(), Vec::new());
        for part in todo.chunks(TREES_PER_FETCH) {
            rules.running()?;
            let chunks = shards.get(part.to_vec()).await?;
            let (trees, more) = rules.add_trees(&mut w, &chunks)?;
            next.extend(trees);
            lists.extend(more);
        }
        for part in lists.chunks(LISTS_PER_FETCH) {
            rules.running()?;
            let chunks = shards.get(part.to_vec()).await?;
            rules.add_lists(&mut w, &chunks)?;
        }
        level = next;
    }
    Ok(w)
}

/// The GC mark's walk: everything reachable from many roots, each id reported to a callback
/// instead of collected in a set (a mark of 10⁸ chunks is a bitmap, not 3 GB of ids; see
/// `maintenance::gc`). Trees and list chunks are read once per marker: snapshots share most of
/// their trees, so only the tree ids seen are remembered (~1 % of a repository's chunks).
#[derive(Debug)]
pub struct Marker {
    shards: Shards,
    seen: HashSet<ChunkId>,
}

impl Marker {
    #[must_use]
    pub fn new(shards: Shards) -> Self {
        Self {
            shards,
            seen: HashSet::new(),
        }
    }

    /// Trees and list chunks read so far.
    #[must_use]
    pub fn trees_seen(&self) -> usize {
        self.seen.len()
    }

    /// Reports to `mark` every tree, list and leaf reachable from `root` that this marker has
    /// not walked yet (leaves may be reported more than once).
    ///
    /// # Errors
    /// A tree or list chunk that is missing or does not decode: the mark is then incomplete and
    /// its run must end before anything is swept (G10).
    pub async fn mark_from(
        &mut self,
        root: ChunkId,
        mark: &mut dyn FnMut(&ChunkId),
    ) -> Result<(), ApplianceError> {
        let mut level = vec![root];
        while !level.is_empty() {
            let todo: Vec<ChunkId> = level.into_iter().filter(|t| self.seen.insert(*t)).collect();
            let (mut next, mut lists) = (Vec::new(), Vec::new());
            for part in todo.chunks(TREES_PER_FETCH) {
                for t in part {
                    mark(t);
                }
                let chunks = self.shards.get(part.to_vec()).await?;
                for r in tree_refs(&chunks)? {
                    next.extend(r.trees);
                    for l in &r.leaves {
                        mark(l);
                    }
                    for l in r.lists {
                        mark(&l);
                        if self.seen.insert(l) {
                            lists.push(l);
                        }
                    }
                }
            }
            for part in lists.chunks(LISTS_PER_FETCH) {
                for id in list_refs(&self.shards.get(part.to_vec()).await?)? {
                    mark(&id);
                }
            }
            level = next;
        }
        Ok(())
    }
}

/// The plaintext of a stored chunk.
///
/// # Errors
/// A stored frame that does not decompress (corruption).
pub fn plaintext(c: &StoredChunk) -> Result<Bytes, ApplianceError> {
    if c.compression == v1::Compression::None {
        return Ok(c.data.clone());
    }
    coffer_proto::codec::decode(c.compression, &c.data, c.raw_len as usize)
        .map(Bytes::from)
        .map_err(|e| ApplianceError::Internal(format!("chunk {}: {e}", c.id)))
}

/// The references of one tree object: trees to walk next (`next`, subtrees), leaves (file
/// chunks, bundles) and list chunks.
#[derive(Debug, Default)]
pub(crate) struct TreeRefs {
    trees: Vec<ChunkId>,
    leaves: Vec<ChunkId>,
    lists: Vec<ChunkId>,
}

/// The references a sealed envelope declares (all the appliance can know of it).
fn envelope_refs(c: &StoredChunk) -> Result<sealed::Refs, ApplianceError> {
    sealed::decode_refs(&c.data)
        .map(|(r, _)| r)
        .map_err(|e| bad(format!("chunk {}: {e}", c.id)))
}

/// Decodes tree objects into their references. Errors name the tree, which the caller may read.
/// A sealed tree's references are the ones its envelope declares.
pub(crate) fn tree_refs(chunks: &[StoredChunk]) -> Result<Vec<TreeRefs>, ApplianceError> {
    chunks
        .iter()
        .map(|c| {
            let r = if c.sealed {
                envelope_refs(c)?
            } else {
                let t = v1::Tree::decode(&plaintext(c)?[..])
                    .map_err(|e| bad(format!("chunk {} is not a tree object: {e}", c.id)))?;
                sealed::Refs::of_tree(&t).map_err(|e| bad(format!("tree {}: {e}", c.id)))?
            };
            Ok(TreeRefs {
                trees: r.trees,
                leaves: r.leaves,
                lists: r.lists,
            })
        })
        .collect()
}

/// Decodes list chunks into the chunk ids they hold. A sealed list chunk holds what its
/// envelope declares, every declared id counting as a leaf.
pub(crate) fn list_refs(chunks: &[StoredChunk]) -> Result<Vec<ChunkId>, ApplianceError> {
    let mut out = Vec::new();
    for c in chunks {
        if c.sealed {
            out.extend(envelope_refs(c)?.all().copied());
            continue;
        }
        out.extend(
            unpack_ids(&plaintext(c)?, usize::MAX)
                .map_err(|e| bad(format!("list chunk {}: {e}", c.id)))?,
        );
    }
    Ok(out)
}
