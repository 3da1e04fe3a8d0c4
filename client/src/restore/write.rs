//! Writing restored files: each file's bytes go to a name no one else could have planted
//! (`O_CREAT|O_EXCL|O_NOFOLLOW`, else a fresh temporary name renamed into place), its length is
//! checked against the snapshot, then owner, mode and times are set. Chunks arrive checked
//! against their ids ([`Session::get`]); small files are fetched many per call, big ones in
//! parts. A background flusher writes data back while the restore runs and makes it durable
//! before the restore is reported complete.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_proto::v1::Node;
use coffer_proto::ChunkId;

use crate::net::Session;
use crate::ClientError;

/// A file to restore: where, its entry, and its chunk ids (for a bundled file, its bundle).
pub struct FileJob {
    pub path: PathBuf,
    pub node: Node,
    pub ids: Vec<ChunkId>,
}

/// Files fetched together: small files share one `GetChunks` call.
pub const GROUP_CHUNKS: usize = 256;
/// A file with more chunks is fetched and written in parts of this many.
const PART_CHUNKS: usize = 64;
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

fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Removes whatever is at `p` (file, symlink or directory tree), without following symlinks.
pub fn clear(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes sure `p` is a real directory (not a symlink to one).
pub fn ensure_dir(p: &Path) -> std::io::Result<()> {
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

/// Sets owner (with `chown`), mode and times of the directory `p`.
pub fn set_meta(p: &Path, n: &Node, chown: bool) -> std::io::Result<()> {
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
fn open_dest(p: &Path) -> Result<(File, Option<PathBuf>), ClientError> {
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
            let f = create(&tmp).map_err(|e| ClientError::io("create", &tmp, e))?;
            Ok((f, Some(tmp)))
        }
        Err(e) => Err(ClientError::io("create", p, e)),
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
) -> Result<(), ClientError> {
    if written != n.size {
        drop(f);
        let _ = std::fs::remove_file(tmp.as_deref().unwrap_or(p));
        return Err(ClientError::Restore {
            path: p.to_path_buf(),
            why: format!(
                "restored {written} bytes but the snapshot says {}; the snapshot is damaged",
                n.size
            ),
        });
    }
    if chown {
        let _ = std::os::unix::fs::fchown(&f, Some(n.uid), Some(n.gid));
    }
    let t = time_of(n.mtime_ns);
    f.set_permissions(std::fs::Permissions::from_mode(n.mode & 0o7777))
        .and_then(|()| f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t)))
        .map_err(|e| ClientError::io("set the mode and times of", p, e))?;
    drop(f);
    if let Some(tmp) = tmp {
        clear(p)
            .and_then(|()| std::fs::rename(&tmp, p))
            .map_err(|e| ClientError::io("replace", p, e))?;
    }
    Ok(())
}

/// Writes restored data back to disk while the restore runs (`syncfs` on the target's file
/// system in a loop), so that the disk works in parallel with fetching and decoding, and makes
/// the whole restore durable before it is reported complete.
pub struct Flusher {
    target: PathBuf,
    dir: File,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the restore asks the kernel to write back what it has restored so far.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

impl Flusher {
    /// Starts flushing the file system that holds `target`.
    pub fn start(target: &Path) -> Result<Self, ClientError> {
        let open = |e| ClientError::io("open", target, e);
        let dir = File::open(target).map_err(open)?;
        let bg = dir.try_clone().map_err(open)?;
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
            })
            .map_err(|e| ClientError::Task(format!("cannot start the restore flusher: {e}")))?;
        Ok(Self {
            target: target.to_path_buf(),
            dir,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the background flushing and writes everything still dirty.
    pub fn finish(mut self) -> Result<(), ClientError> {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        rustix::fs::syncfs(&self.dir).map_err(|e| {
            ClientError::io(
                "write to disk the files restored in",
                &self.target,
                e.into(),
            )
        })
    }
}

/// Runs blocking file-system work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(f).await?
}

/// Fetches one group's chunks (checked against their ids by [`Session::get`]) and writes its
/// files on a blocking thread; groups run as separate tasks, so fetching, checking and writing
/// proceed on every core at once. Returns the bytes written.
///
/// # Errors
/// RPC failures, I/O errors, files the snapshot describes inconsistently.
pub async fn restore_group(
    session: Session,
    group: Vec<FileJob>,
    chown: bool,
) -> Result<u64, ClientError> {
    if group.len() == 1 && group[0].ids.len() > GROUP_CHUNKS {
        let job = group.into_iter().next().expect("one file");
        return restore_big(&session, job, chown).await;
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
            bytes += write_file(job, &data, chown)?;
        }
        Ok(bytes)
    })
    .await
}

/// One large file: fetched and written in parts.
async fn restore_big(session: &Session, job: FileJob, chown: bool) -> Result<u64, ClientError> {
    let path = job.path.clone();
    let (mut f, tmp) = blocking(move || open_dest(&path)).await?;
    let mut written = 0;
    for part in job.ids.chunks(PART_CHUNKS) {
        let data = session.get(part).await?;
        let path = job.path.clone();
        let (back, n) = blocking(move || {
            let mut n = 0;
            for d in &data {
                f.write_all(d)
                    .map_err(|e| ClientError::io("write", &path, e))?;
                n += d.len() as u64;
            }
            Ok((f, n))
        })
        .await?;
        f = back;
        written += n;
    }
    blocking(move || install(f, tmp, written, &job.path, &job.node, chown)).await?;
    Ok(written)
}

/// Writes one file of a group from the group's chunks `data`; returns its length.
fn write_file(
    job: &FileJob,
    data: &HashMap<ChunkId, bytes::Bytes>,
    chown: bool,
) -> Result<u64, ClientError> {
    let (mut f, tmp) = open_dest(&job.path)?;
    let write_err = |e| ClientError::io("write", &job.path, e);
    let mut written = 0;
    if job.node.bundle.is_empty() {
        for id in &job.ids {
            let chunk = &data[id];
            f.write_all(chunk).map_err(write_err)?;
            written += chunk.len() as u64;
        }
    } else {
        // The file is `size` bytes at `bundle_offset` of its bundle (checked bounds: a
        // malformed tree writes nothing wrong).
        let bundle = &data[&job.ids[0]];
        let start = usize::try_from(job.node.bundle_offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(job.node.size).unwrap_or(usize::MAX));
        let Some(slice) = bundle.get(start..end) else {
            drop(f);
            let _ = std::fs::remove_file(tmp.as_deref().unwrap_or(&job.path));
            return Err(ClientError::Restore {
                path: job.path.clone(),
                why: format!(
                    "the snapshot places it outside its bundle ({} bytes); the snapshot is damaged",
                    bundle.len()
                ),
            });
        };
        f.write_all(slice).map_err(write_err)?;
        written = slice.len() as u64;
    }
    install(f, tmp, written, &job.path, &job.node, chown)?;
    Ok(written)
}
