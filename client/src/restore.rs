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
//! * A restore reported complete is on disk: the target's file system is synced before the
//!   summary is returned (and written back in the background while the restore runs).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_proto::v1::{Node, NodeKind, Tree};
use coffer_proto::{unpack_ids, ChunkId};

use crate::session::Session;
use crate::tree::{check_unique, decode_checked};

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
    Ok(fetch_trees(session, &[*id])
        .await?
        .pop()
        .expect("one tree asked, one returned"))
}

/// Most parts one listing may have (a cycle of parts must not loop forever).
const MAX_TREE_PARTS: usize = 1 << 20;

/// Fetches and checks many trees (all their parts), batching each round of parts in one call.
///
/// # Errors
/// RPC failures, corrupt or malicious trees.
pub async fn fetch_trees(session: &Session, ids: &[ChunkId]) -> anyhow::Result<Vec<Tree>> {
    let bytes = session.get(ids).await?;
    let mut trees: Vec<Tree> = ids
        .iter()
        .zip(bytes)
        .map(|(id, b)| decode_checked(id, &b))
        .collect::<Result<_, _>>()?;
    let mut pending: Vec<(usize, ChunkId)> = Vec::new();
    for (i, t) in trees.iter_mut().enumerate() {
        if !t.next.is_empty() {
            pending.push((i, ChunkId::from_slice(&t.next)?));
        }
    }
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        anyhow::ensure!(
            rounds <= MAX_TREE_PARTS,
            "a tree has more than {MAX_TREE_PARTS} parts (a cycle?)"
        );
        let part_ids: Vec<ChunkId> = pending.iter().map(|p| p.1).collect();
        let parts = session.get(&part_ids).await?;
        let mut again = Vec::new();
        for ((i, pid), b) in pending.into_iter().zip(parts) {
            let part = decode_checked(&pid, &b)?;
            trees[i].nodes.extend(part.nodes);
            if !part.next.is_empty() {
                again.push((i, ChunkId::from_slice(&part.next)?));
            }
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
/// RPC failures, malformed lists.
pub async fn node_chunk_ids(session: &Session, n: &Node) -> anyhow::Result<Vec<ChunkId>> {
    if !n.bundle.is_empty() {
        return Ok(vec![ChunkId::from_slice(&n.bundle)?]);
    }
    if n.chunk_lists.is_empty() {
        return Ok(unpack_ids(&n.chunks, usize::MAX)?);
    }
    let lists = unpack_ids(&n.chunk_lists, usize::MAX)?;
    let mut out = Vec::new();
    for l in session.get(&lists).await? {
        out.extend(unpack_ids(&l, usize::MAX)?);
    }
    Ok(out)
}

/// Files fetched together: small files share one `GetChunks` call.
const GROUP_CHUNKS: usize = 256;
const GROUP_BYTES: u64 = 16 << 20;
/// Groups restored at the same time.
const GROUPS_IN_FLIGHT: usize = 8;
/// `O_NOFOLLOW` on Linux.
const O_NOFOLLOW: i32 = 0o400_000;

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);
/// Files are created one at a time, whatever the number of writers: ext4 looks for a free inode
/// by scanning its group, and without a journal it also skips every inode freed in the last
/// minutes (`recently_deleted`). Parallel creators multiply that kernel work: restoring the Linux
/// tree right after a similar tree was deleted took 8.7–10.6 s of kernel CPU with 8 creators and
/// 3.5 s with creation serialised (and 0.1–0.3 s more wall time on a journalled ext4, where the
/// scan does not happen). Writing the data stays parallel.
static CREATE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn set_meta(p: &Path, n: &Node, chown: bool) -> std::io::Result<()> {
    if chown {
        let _ = std::os::unix::fs::lchown(p, Some(n.uid), Some(n.gid));
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(n.mode & 0o7777))?;
    let t = time_of(n.mtime_ns);
    File::open(p)?.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))
}

/// Opens where `p`'s bytes go: `p` itself when nothing is there (`O_CREAT|O_EXCL|O_NOFOLLOW`
/// never follows a symlink), else a fresh temporary name beside it that is renamed over `p` once
/// complete, so whatever was at `p` (a planted symlink included) is replaced, never written
/// through.
fn open_dest(p: &Path) -> std::io::Result<(File, Option<PathBuf>)> {
    let create = |q: &Path| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(O_NOFOLLOW)
            .open(q)
    };
    let guard = CREATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let first = create(p);
    drop(guard);
    match first {
        Ok(f) => Ok((f, None)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let dir = p.parent().unwrap_or(Path::new("."));
            let tmp = dir.join(format!(
                ".coffer-restore-{}-{}",
                std::process::id(),
                TMP_SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_file(&tmp);
            Ok((create(&tmp)?, Some(tmp)))
        }
        Err(e) => Err(e),
    }
}

/// Checks the length, sets owner, mode and times on the open file, and moves a temporary file
/// into place.
fn install(
    f: File,
    tmp: Option<PathBuf>,
    written: u64,
    p: &Path,
    n: &Node,
    chown: bool,
) -> anyhow::Result<()> {
    if written != n.size {
        drop(f);
        let _ = std::fs::remove_file(tmp.as_deref().unwrap_or(p));
        anyhow::bail!(
            "{}: restored {written} bytes but the snapshot says {}",
            p.display(),
            n.size
        );
    }
    if chown {
        let _ = std::os::unix::fs::fchown(&f, Some(n.uid), Some(n.gid));
    }
    f.set_permissions(std::fs::Permissions::from_mode(n.mode & 0o7777))?;
    let t = time_of(n.mtime_ns);
    f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))?;
    drop(f);
    if let Some(tmp) = tmp {
        clear(p)?;
        std::fs::rename(&tmp, p)?;
    }
    Ok(())
}

/// Writes restored data back to disk while the restore runs (`syncfs` on the target's file
/// system in a loop), so that the disk works in parallel with fetching and decoding, and makes
/// the whole restore durable before it is reported complete.
struct Flusher {
    dir: File,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(target: &Path) -> anyhow::Result<Self> {
        let dir = File::open(target).map_err(|e| anyhow::anyhow!("{}: {e}", target.display()))?;
        let bg = dir.try_clone()?;
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("restore-flush".into())
            .spawn(move || {
                // Errors here only cost speed: the final flush reports them.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(FLUSH_EVERY)
                {
                    let _ = rustix::fs::syncfs(&bg);
                }
            })?;
        Ok(Self {
            dir,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the background flushing and writes everything still dirty.
    fn finish(mut self) -> anyhow::Result<()> {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        rustix::fs::syncfs(&self.dir)
            .map_err(|e| anyhow::anyhow!("writing the restored files to disk failed: {e}"))
    }
}

/// How often the restore asks the kernel to write back what it has restored so far.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

struct FileJob {
    path: PathBuf,
    node: Node,
    ids: Vec<ChunkId>,
}

/// Runs blocking file-system work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("restore worker failed: {e}"))?
}

/// Fetches one group's chunks (checked against their ids by [`Session::get`]) and writes its
/// files on a blocking thread; groups run as separate tasks, so fetching, checking and writing
/// proceed on every core at once.
async fn restore_group(session: Session, group: Vec<FileJob>, chown: bool) -> anyhow::Result<u64> {
    if group.len() == 1 && group[0].ids.len() > GROUP_CHUNKS {
        // One large file: fetch and write it in parts.
        let job = group.into_iter().next().expect("one file");
        let path = job.path.clone();
        let (mut f, tmp) = blocking(move || Ok(open_dest(&path)?)).await?;
        let mut written = 0;
        for part in job.ids.chunks(64) {
            let data = session.get(part).await?;
            let (back, n) = blocking(move || {
                let mut n = 0;
                for d in &data {
                    f.write_all(d)?;
                    n += d.len() as u64;
                }
                Ok((f, n))
            })
            .await?;
            f = back;
            written += n;
        }
        blocking(move || install(f, tmp, written, &job.path, &job.node, chown)).await?;
        return Ok(written);
    }
    // Bundled files of a group often share a bundle: fetch each chunk once.
    let mut ids: Vec<ChunkId> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for id in group.iter().flat_map(|j| j.ids.iter()) {
        if seen.insert(*id) {
            ids.push(*id);
        }
    }
    let data: HashMap<ChunkId, bytes::Bytes> =
        ids.iter().copied().zip(session.get(&ids).await?).collect();
    blocking(move || {
        let mut bytes = 0;
        for job in &group {
            let (mut f, tmp) = open_dest(&job.path)?;
            let mut written = 0;
            if job.node.bundle.is_empty() {
                for id in &job.ids {
                    let chunk = &data[id];
                    f.write_all(chunk)?;
                    written += chunk.len() as u64;
                }
            } else {
                // The file is `size` bytes at `bundle_offset` of its bundle (checked bounds: a
                // malformed tree writes nothing wrong).
                let bundle = &data[&job.ids[0]];
                let start = usize::try_from(job.node.bundle_offset).unwrap_or(usize::MAX);
                let end =
                    start.saturating_add(usize::try_from(job.node.size).unwrap_or(usize::MAX));
                let Some(slice) = bundle.get(start..end) else {
                    drop(f);
                    let _ = std::fs::remove_file(tmp.as_deref().unwrap_or(&job.path));
                    anyhow::bail!(
                        "{}: the snapshot places it outside its bundle ({} bytes)",
                        job.path.display(),
                        bundle.len()
                    );
                };
                f.write_all(slice)?;
                written = slice.len() as u64;
            }
            install(f, tmp, written, &job.path, &job.node, chown)?;
            bytes += written;
        }
        Ok(bytes)
    })
    .await
}

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
) -> anyhow::Result<RestoreSummary> {
    ensure_dir(target).map_err(|e| anyhow::anyhow!("{}: {e}", target.display()))?;
    let mut sum = RestoreSummary::default();
    let mut dirs: Vec<(PathBuf, Node)> = Vec::new();
    let mut files: Vec<FileJob> = Vec::new();
    let mut links: Vec<(PathBuf, u64)> = Vec::new();
    let mut first_of_group: HashMap<u64, PathBuf> = HashMap::new();
    let mut level: Vec<(PathBuf, ChunkId)> = vec![(target.to_path_buf(), root)];
    while !level.is_empty() {
        let ids: Vec<ChunkId> = level.iter().map(|l| l.1).collect();
        let trees = fetch_trees(session, &ids).await?;
        let mut next = Vec::new();
        for ((dir, _), tree) in level.into_iter().zip(trees) {
            for n in tree.nodes {
                let p = dir.join(OsStr::from_bytes(&n.name));
                match NodeKind::try_from(n.kind) {
                    Ok(NodeKind::Dir) => {
                        let sub = ChunkId::from_slice(&n.subtree)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                        ensure_dir(&p)?;
                        next.push((p.clone(), sub));
                        dirs.push((p, n));
                    }
                    Ok(NodeKind::File) => {
                        if n.hardlink_group != 0 {
                            if first_of_group.contains_key(&n.hardlink_group) {
                                links.push((p, n.hardlink_group));
                                continue;
                            }
                            first_of_group.insert(n.hardlink_group, p.clone());
                        }
                        let ids = node_chunk_ids(session, &n)
                            .await
                            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                        files.push(FileJob {
                            path: p,
                            node: n,
                            ids,
                        });
                    }
                    Ok(NodeKind::Symlink) => {
                        clear(&p)?;
                        std::os::unix::fs::symlink(OsStr::from_bytes(&n.symlink_target), &p)?;
                        if chown {
                            let _ = std::os::unix::fs::lchown(&p, Some(n.uid), Some(n.gid));
                        }
                        sum.symlinks += 1;
                    }
                    _ => anyhow::bail!("{}: unknown node kind {}", p.display(), n.kind),
                }
            }
        }
        level = next;
    }

    let flusher = Flusher::start(target)?;
    let mut groups: Vec<Vec<FileJob>> = Vec::new();
    let (mut cur_chunks, mut cur_bytes) = (0usize, 0u64);
    sum.files = files.len() as u64;
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
    let mut running = tokio::task::JoinSet::new();
    let join = |r: Result<anyhow::Result<u64>, tokio::task::JoinError>| {
        r.map_err(|e| anyhow::anyhow!("restore task failed: {e}"))?
    };
    for g in groups {
        while running.len() >= GROUPS_IN_FLIGHT {
            if let Some(r) = running.join_next().await {
                sum.bytes += join(r)?;
            }
        }
        running.spawn(restore_group(session.clone(), g, chown));
    }
    while let Some(r) = running.join_next().await {
        sum.bytes += join(r)?;
    }

    for (p, g) in links {
        clear(&p)?;
        std::fs::hard_link(&first_of_group[&g], &p)?;
        sum.files += 1;
    }
    // Deepest first, so that setting a directory's mtime is the last change inside it.
    for (p, n) in dirs.iter().rev() {
        set_meta(p, n, chown)?;
        sum.dirs += 1;
    }
    flusher.finish()?;
    Ok(sum)
}
