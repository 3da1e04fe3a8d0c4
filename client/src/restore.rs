//! Restore: the reverse of a backup, never touching anything outside the target directory (F3).
//!
//! * Names come from trees checked by [`crate::tree::decode_checked`] (no `/`, NUL, `.`, `..`,
//!   empty or duplicate names).
//! * Before descending into or writing beside a path, the restorer checks with `lstat` that every
//!   directory it uses is a real directory it created or found, never a symlink: an existing
//!   symlink in the target is removed and replaced, not followed.
//! * Files are written to a fresh temporary name (`O_CREAT|O_EXCL`) in their directory and
//!   renamed into place, so a planted symlink at the final name is replaced, never written
//!   through. Every chunk is checked against its id before a byte of it is written.
//! * Re-running an interrupted restore is safe: everything is overwritten in place.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_proto::v1::{Node, NodeKind, Tree};
use coffer_proto::{unpack_ids, ChunkId};

use crate::session::Session;
use crate::tree::decode_checked;

/// What a restore did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Removes whatever is at `p` (file, symlink or directory tree), without following symlinks.
fn clear(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes sure `p` is a real directory (not a symlink to one).
fn ensure_dir(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => {
            std::fs::remove_file(p)?;
            std::fs::create_dir(p)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(p),
        Err(e) => Err(e),
    }
}

/// Fetches and checks one tree.
///
/// # Errors
/// RPC failures, corrupt or malicious trees.
pub async fn fetch_tree(session: &Session, id: &ChunkId) -> anyhow::Result<Tree> {
    let bytes = session.get(&[*id]).await?;
    let b = bytes
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("tree {id} missing"))?;
    Ok(decode_checked(id, &b)?)
}

struct Restorer<'a> {
    session: &'a Session,
    links: HashMap<u64, PathBuf>,
    sum: RestoreSummary,
    chown: bool,
}

impl Restorer<'_> {
    async fn dir(&mut self, tree_id: ChunkId, path: &Path) -> anyhow::Result<()> {
        let tree = fetch_tree(self.session, &tree_id).await?;
        for n in &tree.nodes {
            let p = path.join(OsStr::from_bytes(&n.name));
            match NodeKind::try_from(n.kind) {
                Ok(NodeKind::Dir) => {
                    let sub = ChunkId::from_slice(&n.subtree)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                    ensure_dir(&p)?;
                    Box::pin(self.dir(sub, &p)).await?;
                    self.meta(&p, n, false)?;
                    self.sum.dirs += 1;
                }
                Ok(NodeKind::File) => self.file(n, &p).await?,
                Ok(NodeKind::Symlink) => {
                    clear(&p)?;
                    std::os::unix::fs::symlink(OsStr::from_bytes(&n.symlink_target), &p)?;
                    if self.chown {
                        let _ = std::os::unix::fs::lchown(&p, Some(n.uid), Some(n.gid));
                    }
                    self.sum.symlinks += 1;
                }
                _ => anyhow::bail!("{}: unknown node kind {}", p.display(), n.kind),
            }
        }
        Ok(())
    }

    async fn file(&mut self, n: &Node, p: &Path) -> anyhow::Result<()> {
        if n.hardlink_group != 0 {
            if let Some(first) = self.links.get(&n.hardlink_group) {
                clear(p)?;
                std::fs::hard_link(first, p)?;
                self.sum.files += 1;
                return Ok(());
            }
        }
        let ids = unpack_ids(&n.chunks, usize::MAX)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        let dir = p.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".coffer-restore-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc_o_nofollow())
            .open(&tmp)?;
        let mut written = 0u64;
        for part in ids.chunks(64) {
            for data in self.session.get(part).await? {
                f.write_all(&data)?;
                written += data.len() as u64;
            }
        }
        if written != n.size {
            drop(f);
            let _ = std::fs::remove_file(&tmp);
            anyhow::bail!(
                "{}: restored {written} bytes but the snapshot says {}",
                p.display(),
                n.size
            );
        }
        f.sync_data()?;
        drop(f);
        clear(p)?;
        std::fs::rename(&tmp, p)?;
        self.meta(p, n, true)?;
        if n.hardlink_group != 0 {
            self.links.insert(n.hardlink_group, p.to_path_buf());
        }
        self.sum.files += 1;
        self.sum.bytes += written;
        Ok(())
    }

    fn meta(&self, p: &Path, n: &Node, _file: bool) -> anyhow::Result<()> {
        if self.chown {
            let _ = std::os::unix::fs::lchown(p, Some(n.uid), Some(n.gid));
        }
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(n.mode & 0o7777))?;
        let t = time_of(n.mtime_ns);
        File::open(p)?.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))?;
        Ok(())
    }
}

const fn libc_o_nofollow() -> i32 {
    // O_NOFOLLOW on Linux (all architectures coffer supports).
    0o400_000
}

/// Restores the tree `root` (a directory) into `target`, creating it if needed.
///
/// # Errors
/// RPC failures, a target that is not a directory, malicious trees, I/O errors.
/// `chown`: also restore owners (only when running as root).
pub async fn restore(
    session: &Session,
    root: ChunkId,
    target: &Path,
    chown: bool,
) -> anyhow::Result<RestoreSummary> {
    ensure_dir(target).map_err(|e| anyhow::anyhow!("{}: {e}", target.display()))?;
    let mut r = Restorer {
        session,
        links: HashMap::new(),
        sum: RestoreSummary::default(),
        chown,
    };
    r.dir(root, target).await?;
    Ok(r.sum)
}
