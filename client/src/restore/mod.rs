//! Restore: the reverse of a backup, never touching anything outside the target directory (F3).
//!
//! * Names come from trees checked by [`crate::snapshot::tree::decode_checked`] (no `/`, NUL,
//!   `.`, `..`, empty or duplicate names).
//! * Before descending into or writing beside a path, the restorer checks with `lstat` that every
//!   directory it uses is a real directory it created or found, never a symlink: an existing
//!   symlink in the target is removed and replaced, not followed.
//! * Files are written to a fresh temporary name (`O_CREAT|O_EXCL`) in their directory and
//!   renamed into place, so a planted symlink at the final name is replaced, never written
//!   through. Every chunk is checked against its id before a byte of it is written.
//! * Re-running an interrupted restore is safe: everything is overwritten in place. What is
//!   already in the target is replaced ([`Overwrite::Always`], the default), replaced only when
//!   its size or modification time differs ([`Overwrite::IfChanged`]), or kept
//!   ([`Overwrite::Never`]); the summary counts both.
//! * A restore reported complete is on disk: the target's file system is synced before the
//!   summary is returned (and written back in the background while the restore runs).
//!
//! Owns: [`plan`] (read the trees, make directories and symlinks) and [`write`] (files, their
//! metadata, durability). Must never touch: the appliance's state (a restore only reads), the
//! backup stages or the local tree cache, and any path outside the target.

mod plan;
mod write;

use std::path::Path;

use coffer_proto::ChunkId;

use crate::net::Session;
use crate::ClientError;
use plan::Plan;
use write::{clear, ensure_dir, restore_group, set_meta, FileJob, Flusher, GROUP_CHUNKS};

/// What a restore did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Files and symlinks that were already in the target and were replaced.
    pub replaced: u64,
    /// Files and symlinks already in the target and left as they were ([`Overwrite`]).
    pub kept: u64,
}

/// What to do with a file or symlink the target already has.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overwrite {
    /// Replace it.
    #[default]
    Always,
    /// Replace it unless it is the same kind with the same size and modification time (a
    /// symlink: the same target).
    IfChanged,
    /// Keep it.
    Never,
}

/// Most bytes of one group of files fetched together (see [`GROUP_CHUNKS`]).
const GROUP_BYTES: u64 = 16 << 20;
/// Groups restored at the same time.
const GROUPS_IN_FLIGHT: usize = 8;

/// Restores the tree `root` (a directory) into `target`, creating it if needed. Trees are read
/// level by level (one streaming call per level), then files are fetched in groups, several at
/// a time, then hard links are made and directory metadata is set deepest first.
///
/// `chown`: also restore owners (only when running as root).
///
/// # Errors
/// RPC failures, a target that is not a directory, malicious trees, I/O errors.
pub async fn restore(
    session: &Session,
    root: ChunkId,
    target: &Path,
    chown: bool,
) -> Result<RestoreSummary, ClientError> {
    restore_with(session, root, target, chown, Overwrite::Always).await
}

/// [`restore`], deciding with `overwrite` what happens to what the target already has.
///
/// # Errors
/// As [`restore`].
pub async fn restore_with(
    session: &Session,
    root: ChunkId,
    target: &Path,
    chown: bool,
    overwrite: Overwrite,
) -> Result<RestoreSummary, ClientError> {
    ensure_dir(target).map_err(|e| ClientError::io("create", target, e))?;
    let plan = Plan::read(session, root, target, chown, overwrite).await?;
    let mut sum = RestoreSummary {
        files: plan.files.len() as u64,
        symlinks: plan.symlinks,
        replaced: plan.replaced,
        kept: plan.kept,
        ..RestoreSummary::default()
    };
    let flusher = Flusher::start(target)?;
    sum.bytes = write_files(session, plan.files, chown).await?;
    for (p, g) in plan.links {
        if overwrite == Overwrite::Never && std::fs::symlink_metadata(&p).is_ok() {
            sum.kept += 1;
            continue;
        }
        clear(&p)
            .and_then(|()| std::fs::hard_link(&plan.first_of_group[&g], &p))
            .map_err(|e| ClientError::io("create the hard link", &p, e))?;
        sum.files += 1;
    }
    // Deepest first, so that setting a directory's mtime is the last change inside it.
    for (p, n) in plan.dirs.iter().rev() {
        set_meta(p, n, chown).map_err(|e| ClientError::io("set the metadata of", p, e))?;
        sum.dirs += 1;
    }
    flusher.finish()?;
    Ok(sum)
}

/// Writes `files` in groups (small files share one fetch), [`GROUPS_IN_FLIGHT`] groups at a
/// time; returns the bytes written.
async fn write_files(
    session: &Session,
    files: Vec<FileJob>,
    chown: bool,
) -> Result<u64, ClientError> {
    let mut groups: Vec<Vec<FileJob>> = Vec::new();
    let (mut cur_chunks, mut cur_bytes) = (0usize, 0u64);
    for f in files {
        if groups.is_empty()
            || cur_chunks + f.ids.len() > GROUP_CHUNKS
            || cur_bytes + f.node.size > GROUP_BYTES
        {
            groups.push(Vec::new());
            cur_chunks = 0;
            cur_bytes = 0;
        }
        cur_chunks += f.ids.len();
        cur_bytes += f.node.size;
        groups.last_mut().expect("pushed").push(f);
    }
    let mut bytes = 0;
    let mut running = tokio::task::JoinSet::new();
    for g in groups {
        while running.len() >= GROUPS_IN_FLIGHT {
            if let Some(r) = running.join_next().await {
                bytes += r??;
            }
        }
        running.spawn(restore_group(session.clone(), g, chown));
    }
    while let Some(r) = running.join_next().await {
        bytes += r??;
    }
    Ok(bytes)
}
