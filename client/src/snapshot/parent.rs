//! Parent snapshots: a file whose size, mtime, ctime and inode equal those recorded in the
//! previous snapshot of the same `user@host:path` is not read again; its chunk list is taken from
//! the parent tree (read through the local [`super::cache`]).
//!
//! Before a backup the newest snapshot of each of the user's paths is opened too, so that data
//! this user already backed up, from any path, is neither sent again nor refused as a reference.

use std::collections::{HashMap, HashSet};

use coffer_proto::v1::{self, NodeKind};
use coffer_proto::{ChunkId, SnapshotId};

use super::cache::TreeCache;
use super::fetch::node_chunk_ids;
use super::tree::FileContent;
use crate::net::Session;
use crate::stages::walk::{Dir, Entry, Walk};
use crate::ClientError;

/// Own snapshots (newest per path) opened before a backup.
const OPEN_OWN_SNAPSHOTS: usize = 16;

/// Prepares a backup of `walk` (the tree at `path`): opens the user's newest snapshots and,
/// unless `no_parent`, takes from the newest complete snapshot of `path` the content of every
/// file it has unchanged. Returns each file's content where known (`None`: to be read) and how
/// many files that is.
///
/// # Errors
/// RPC failures, corrupt parent trees.
pub async fn reuse(
    session: &Session,
    cache: &TreeCache,
    walk: &Walk,
    path: &str,
    no_parent: bool,
) -> Result<Reused, ClientError> {
    let mut out = Reused {
        contents: vec![None; walk.files.len()],
        unchanged: 0,
        own: Vec::new(),
        warnings: Vec::new(),
    };
    // Open the newest snapshot of each of the user's paths (the parent among them): the
    // appliance then counts their chunks as known to this session, so that data this user
    // already backed up, from any path, is not sent again, and the new snapshot may reference
    // it (the appliance refuses references to chunks a session neither sent nor opened). One
    // that cannot be opened (a damaged tree) only costs that saving: it is named and skipped.
    if session.write_only() {
        // A write-only account lists and opens nothing: every file is read, and what the
        // appliance holds is deduplicated there (answered present or proved).
        return Ok(out);
    }
    let own = session.list("", false).await?;
    let mut newest: HashMap<&str, &v1::Snapshot> = HashMap::new();
    for s in own.iter().filter(|s| !s.partial) {
        newest.insert(&s.path, s);
    }
    let mut newest: Vec<&v1::Snapshot> = newest.into_values().collect();
    newest.sort_by_key(|s| std::cmp::Reverse(s.time_us));
    for s in newest.iter().take(OPEN_OWN_SNAPSHOTS) {
        if let Err(e) = session.open(&snapshot_id(s)?).await {
            out.warnings.push(format!(
                "snapshot {} of {} could not be opened, its data is sent again if needed: {e}",
                hex::encode(&s.id),
                s.path
            ));
        }
    }
    if !no_parent {
        if let Some(parent) = own.iter().filter(|s| s.path == path).rfind(|s| !s.partial) {
            let proot = ChunkId::from_slice(&parent.root).map_err(|_| {
                ClientError::Protocol(format!(
                    "snapshot {} has a malformed root tree id",
                    hex::encode(&parent.id)
                ))
            })?;
            match session.open_damaged(&snapshot_id(parent)?).await {
                Ok(damaged) => {
                    let damaged: HashSet<ChunkId> = damaged.into_iter().collect();
                    if !damaged.is_empty() {
                        out.warnings.push(format!(
                            "the appliance found {} chunks of the previous snapshot damaged: \
                             the files using them are read and sent again",
                            damaged.len()
                        ));
                    }
                    let mut m = Matcher {
                        session,
                        cache,
                        damaged: &damaged,
                        reuse: &mut out.contents,
                    };
                    out.unchanged = m.dir(&walk.root, proot).await?;
                }
                Err(e) => out.warnings.push(format!(
                    "the previous snapshot {} could not be opened, every file is read: {e}",
                    hex::encode(&parent.id)
                )),
            }
        }
    }
    out.own = own;
    Ok(out)
}

/// What [`reuse`] found.
#[derive(Debug)]
pub struct Reused {
    /// Per file of the walk: its content in the parent, when unchanged and reusable.
    pub contents: Vec<Option<FileContent>>,
    /// Files reused.
    pub unchanged: u64,
    /// The account's own snapshots, as listed.
    pub own: Vec<v1::Snapshot>,
    pub warnings: Vec<String>,
}

/// The id of a snapshot the appliance listed.
fn snapshot_id(s: &v1::Snapshot) -> Result<SnapshotId, ClientError> {
    SnapshotId::from_slice(&s.id)
        .map_err(|e| ClientError::Protocol(format!("a listed snapshot has a malformed id: {e}")))
}

/// Matches the walk against the parent's trees.
struct Matcher<'a> {
    session: &'a Session,
    cache: &'a TreeCache,
    /// Chunks the appliance found damaged: a file using one is read again.
    damaged: &'a HashSet<ChunkId>,
    reuse: &'a mut [Option<FileContent>],
}

impl Matcher<'_> {
    /// For every file of `dir` unchanged since the parent tree `parent` (and whose chunks are
    /// not damaged), stores its chunk list in `reuse[file]`. Returns how many files were
    /// matched.
    ///
    /// # Errors
    /// RPC failures, corrupt parent trees.
    async fn dir(&mut self, dir: &Dir, parent: ChunkId) -> Result<u64, ClientError> {
        let tree = self.cache.load(self.session, &parent).await?;
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
                    if !same {
                        continue;
                    }
                    let content = if n.bundle.is_empty() {
                        node_chunk_ids(self.session, n)
                            .await
                            .ok()
                            .map(|ids| FileContent {
                                size: n.size,
                                chunks: ids,
                                bundle: None,
                            })
                    } else {
                        ChunkId::from_slice(&n.bundle).ok().map(|id| FileContent {
                            size: n.size,
                            chunks: Vec::new(),
                            bundle: Some((id, n.bundle_offset)),
                        })
                    };
                    let Some(content) = content else {
                        continue;
                    };
                    let damaged = content.chunks.iter().any(|c| self.damaged.contains(c))
                        || content
                            .bundle
                            .is_some_and(|(b, _)| self.damaged.contains(&b));
                    if !damaged {
                        self.reuse[*file] = Some(content);
                        matched += 1;
                    }
                }
                Entry::Dir { name, dir, .. } => {
                    let Some(n) = by_name.get(&name[..]) else {
                        continue;
                    };
                    if NodeKind::try_from(n.kind) == Ok(NodeKind::Dir) {
                        if let Ok(sub) = ChunkId::from_slice(&n.subtree) {
                            matched += Box::pin(self.dir(dir, sub)).await?;
                        }
                    }
                }
                Entry::Symlink { .. } => {}
            }
        }
        Ok(matched)
    }
}
