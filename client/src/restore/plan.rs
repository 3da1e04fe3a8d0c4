//! The first half of a restore: read the snapshot's trees level by level (one streaming call per
//! level), creating directories and symlinks on the way, and list what the second half writes:
//! files (with their chunk ids), hard links, and directories whose metadata is set last.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use coffer_proto::v1::{Node, NodeKind};
use coffer_proto::ChunkId;

use super::write::{clear, ensure_dir, FileJob};
use super::Overwrite;
use crate::net::Session;
use crate::snapshot::tree::subtree_of;
use crate::snapshot::{fetch_trees, node_chunk_ids};
use crate::ClientError;

/// What is left to do once every tree was read.
#[derive(Default)]
pub struct Plan {
    /// Directories, parents before children.
    pub dirs: Vec<(PathBuf, Node)>,
    pub files: Vec<FileJob>,
    /// Later links of a hard-link group: (path, group).
    pub links: Vec<(PathBuf, u64)>,
    /// The file restored for each hard-link group.
    pub first_of_group: HashMap<u64, PathBuf>,
    pub symlinks: u64,
    overwrite: Overwrite,
    /// Existing files and symlinks replaced, and kept.
    pub replaced: u64,
    pub kept: u64,
}

/// Whether `p`, as found in the target, stays: `Some(true)` keep it, `Some(false)` replace it,
/// `None` nothing there.
fn keep_existing(p: &Path, n: &Node, overwrite: Overwrite) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).ok()?;
    Some(match overwrite {
        Overwrite::Always => false,
        Overwrite::Never => true,
        Overwrite::IfChanged => match NodeKind::try_from(n.kind) {
            Ok(NodeKind::File) => {
                m.file_type().is_file()
                    && m.len() == n.size
                    && m.mtime() * 1_000_000_000 + m.mtime_nsec() == n.mtime_ns
            }
            Ok(NodeKind::Symlink) => {
                m.file_type().is_symlink()
                    && std::fs::read_link(p)
                        .is_ok_and(|t| t.as_os_str().as_bytes() == n.symlink_target.as_ref())
            }
            _ => false,
        },
    })
}

/// A tree error met while restoring `path`, named by that path; RPC and I/O errors are kept as
/// they are.
fn at(path: &Path, e: ClientError) -> ClientError {
    match e {
        ClientError::Tree(t) => ClientError::Restore {
            path: path.to_path_buf(),
            why: t.to_string(),
        },
        other => other,
    }
}

impl Plan {
    /// Reads the trees under `root`, restoring into `target`; `chown` also restores the owners
    /// of symlinks.
    ///
    /// # Errors
    /// RPC failures, malicious or damaged trees, I/O errors.
    pub async fn read(
        session: &Session,
        root: ChunkId,
        target: &Path,
        chown: bool,
        overwrite: Overwrite,
    ) -> Result<Self, ClientError> {
        let mut plan = Self {
            overwrite,
            ..Self::default()
        };
        let mut level: Vec<(PathBuf, ChunkId)> = vec![(target.to_path_buf(), root)];
        while !level.is_empty() {
            let ids: Vec<ChunkId> = level.iter().map(|l| l.1).collect();
            let trees = fetch_trees(session, &ids).await?;
            let mut next = Vec::new();
            for ((dir, id), tree) in level.into_iter().zip(trees) {
                for n in tree.nodes {
                    let p = dir.join(OsStr::from_bytes(&n.name));
                    match NodeKind::try_from(n.kind) {
                        Ok(NodeKind::Dir) => {
                            let sub = subtree_of(&id, &n).map_err(|e| at(&p, e.into()))?;
                            ensure_dir(&p).map_err(|e| ClientError::io("create", &p, e))?;
                            next.push((p.clone(), sub));
                            plan.dirs.push((p, n));
                        }
                        Ok(NodeKind::File) => plan.file(session, p, n).await?,
                        Ok(NodeKind::Symlink) => match keep_existing(&p, &n, overwrite) {
                            Some(true) => plan.kept += 1,
                            found => {
                                symlink(&p, &n, chown)?;
                                plan.symlinks += 1;
                                plan.replaced += u64::from(found.is_some());
                            }
                        },
                        _ => {
                            return Err(ClientError::Restore {
                                path: p,
                                why: format!(
                                    "unknown node kind {}; a newer coffer client may be needed",
                                    n.kind
                                ),
                            })
                        }
                    }
                }
            }
            level = next;
        }
        Ok(plan)
    }

    /// A file entry: a later link of a hard-link group, or a file to write.
    async fn file(&mut self, session: &Session, p: PathBuf, n: Node) -> Result<(), ClientError> {
        if n.hardlink_group != 0 {
            if self.first_of_group.contains_key(&n.hardlink_group) {
                self.links.push((p, n.hardlink_group));
                return Ok(());
            }
            self.first_of_group.insert(n.hardlink_group, p.clone());
        }
        match keep_existing(&p, &n, self.overwrite) {
            Some(true) => {
                self.kept += 1;
                return Ok(());
            }
            Some(false) => self.replaced += 1,
            None => {}
        }
        let ids = node_chunk_ids(session, &n).await.map_err(|e| at(&p, e))?;
        self.files.push(FileJob {
            path: p,
            node: n,
            ids,
        });
        Ok(())
    }
}

/// Replaces whatever is at `p` with the symlink `n`.
fn symlink(p: &Path, n: &Node, chown: bool) -> Result<(), ClientError> {
    clear(p)
        .and_then(|()| std::os::unix::fs::symlink(OsStr::from_bytes(&n.symlink_target), p))
        .map_err(|e| ClientError::io("create the symlink", p, e))?;
    if chown {
        let _ = std::os::unix::fs::lchown(p, Some(n.uid), Some(n.gid));
    }
    Ok(())
}
