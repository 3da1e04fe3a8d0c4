//! The walk stage: stat the tree, remember what each directory holds, and list the regular files
//! whose contents must be read. Symlinks are recorded, never followed.

use crate::policy::{Filter, Left};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::ClientError;

/// Metadata kept for every entry.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub size: u64,
    pub inode: u64,
    pub dev: u64,
}

impl Meta {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            size: m.size(),
            inode: m.ino(),
            dev: m.dev(),
        }
    }
}

/// One entry of a walked directory.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A regular file; `file` indexes [`Walk::files`]. `hardlink_of` names an earlier file of the
    /// same inode, whose content is reused.
    File {
        name: Vec<u8>,
        meta: Meta,
        file: usize,
        hardlink_group: u64,
    },
    Dir {
        name: Vec<u8>,
        meta: Meta,
        dir: Box<Dir>,
    },
    Symlink {
        name: Vec<u8>,
        meta: Meta,
        target: Vec<u8>,
    },
}

/// A walked directory.
#[derive(Debug, Clone, Default)]
pub struct Dir {
    #[expect(
        dead_code,
        reason = "the root's own metadata: a snapshot records entries, not its root directory"
    )]
    pub meta: Meta,
    pub entries: Vec<Entry>,
}

/// A regular file to read. `same_as` is set for the second and later hard links of an inode.
#[derive(Debug, Clone)]
pub struct FileJob {
    pub path: PathBuf,
    pub size: u64,
    pub same_as: Option<usize>,
}

/// The result of the walk.
#[derive(Debug, Default)]
pub struct Walk {
    pub root: Dir,
    pub files: Vec<FileJob>,
    /// Entries that could not be read (path, reason); the snapshot is then partial.
    pub errors: Vec<(PathBuf, String)>,
    /// The first [`LEFT_OUT_SHOWN`] entries the policy leaves out (not an error: the snapshot
    /// is whole for the policy), and how many there were in all.
    pub left_out: Vec<(PathBuf, Left)>,
    pub left_out_total: u64,
    pub bytes: u64,
}

/// Directory levels below the root whose subdirectories are walked on their own threads.
const PARALLEL_DEPTH: usize = 3;
/// Threads stat-ing at the same time (a cold stat walk is latency-bound: 8 walkers read the
/// Linux tree's metadata in 0.62 s against 0.9 s for one on the 2-core machine).
const WALKERS: usize = 8;

/// What the parallel scan found, before file numbering and hard-link grouping.
enum Scanned {
    File {
        name: Vec<u8>,
        meta: Meta,
        path: PathBuf,
        nlink: u64,
    },
    Dir {
        name: Vec<u8>,
        meta: Meta,
        dir: ScanDir,
    },
    Symlink {
        name: Vec<u8>,
        meta: Meta,
        target: Vec<u8>,
    },
}

/// An entry of a directory being scanned: done, or a subdirectory scanned on its own thread.
enum Slot<'s> {
    Done(Scanned),
    Spawned(
        Vec<u8>,
        Meta,
        PathBuf,
        std::thread::ScopedJoinHandle<'s, std::io::Result<ScanDir>>,
    ),
}

struct ScanDir {
    meta: Meta,
    entries: Vec<Scanned>,
    errors: Vec<(PathBuf, String)>,
    left_out: Vec<(PathBuf, Left)>,
    left_out_total: u64,
}

/// Left-out entries remembered by path (the rest are only counted: a policy may leave out
/// millions of files).
pub const LEFT_OUT_SHOWN: usize = 20;

/// What every scanning thread shares: the walker budget and the policy's filter.
struct Ctx<'a> {
    busy: std::sync::atomic::AtomicUsize,
    filter: &'a Filter,
    root_dev: u64,
}

/// Walks `root` (a directory): a parallel scan of metadata, then a sequential pass that numbers
/// files in depth-first order and groups hard links.
///
/// # Errors
/// [`ClientError::Io`] when `root` itself cannot be read, [`ClientError::NotADirectory`].
pub fn walk(root: &Path, filter: &Filter) -> Result<Walk, ClientError> {
    let meta = std::fs::symlink_metadata(root).map_err(|e| ClientError::io("read", root, e))?;
    if !meta.is_dir() {
        return Err(ClientError::NotADirectory(root.to_path_buf()));
    }
    let ctx = Ctx {
        busy: std::sync::atomic::AtomicUsize::new(1),
        filter,
        root_dev: std::os::unix::fs::MetadataExt::dev(&meta),
    };
    let scanned = std::thread::scope(|s| scan(s, &ctx, root, Meta::of(&meta), 0))
        .map_err(|e| ClientError::io("read", root, e))?;
    let mut w = Walk::default();
    let mut links: HashMap<(u64, u64), (usize, u64)> = HashMap::new();
    w.root = number(scanned, &mut w, &mut links);
    Ok(w)
}

fn scan<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    ctx: &'s Ctx<'s>,
    path: &Path,
    meta: Meta,
    depth: usize,
) -> std::io::Result<ScanDir> {
    use std::sync::atomic::Ordering::SeqCst;
    let busy = &ctx.busy;
    let rd = std::fs::read_dir(path)?;
    let mut errors = Vec::new();
    let mut left_out = Vec::new();
    let mut left_out_total = 0u64;
    let mut names: Vec<std::ffi::OsString> = Vec::new();
    for e in rd {
        match e {
            Ok(e) => names.push(e.file_name()),
            Err(e) => errors.push((path.to_path_buf(), e.to_string())),
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let mut slots: Vec<Slot<'s>> = Vec::with_capacity(names.len());
    for name in names {
        let p = path.join(&name);
        let raw = OsStr::as_bytes(&name).to_vec();
        let m = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) => {
                errors.push((p, e.to_string()));
                continue;
            }
        };
        if let Some(why) = ctx.filter.leaves_out(&p, &m, ctx.root_dev) {
            left_out_total += 1;
            if left_out.len() < LEFT_OUT_SHOWN {
                left_out.push((p, why));
            }
            continue;
        }
        let ft = m.file_type();
        let meta = Meta::of(&m);
        if ft.is_dir() {
            let claimed = depth < PARALLEL_DEPTH
                && busy
                    .fetch_update(SeqCst, SeqCst, |n| (n < WALKERS).then_some(n + 1))
                    .is_ok();
            if claimed {
                let (p2, m2) = (p.clone(), meta.clone());
                let h = s.spawn(move || {
                    let r = scan(s, ctx, &p2, m2, depth + 1);
                    busy.fetch_sub(1, SeqCst);
                    r
                });
                slots.push(Slot::Spawned(raw, meta, p, h));
            } else {
                match scan(s, ctx, &p, meta.clone(), depth + 1) {
                    Ok(d) => slots.push(Slot::Done(Scanned::Dir {
                        name: raw,
                        meta,
                        dir: d,
                    })),
                    Err(e) => errors.push((p, e.to_string())),
                }
            }
        } else if ft.is_symlink() {
            match std::fs::read_link(&p) {
                Ok(t) => slots.push(Slot::Done(Scanned::Symlink {
                    name: raw,
                    meta,
                    target: t.as_os_str().as_bytes().to_vec(),
                })),
                Err(e) => errors.push((p, e.to_string())),
            }
        } else if ft.is_file() {
            slots.push(Slot::Done(Scanned::File {
                name: raw,
                meta,
                path: p,
                nlink: m.nlink(),
            }));
        } else {
            errors.push((
                p,
                "special files (devices, sockets, FIFOs) are not backed up".into(),
            ));
        }
    }
    let mut entries = Vec::with_capacity(slots.len());
    for slot in slots {
        match slot {
            Slot::Done(e) => entries.push(e),
            Slot::Spawned(name, meta, p, h) => match h.join() {
                Ok(Ok(d)) => entries.push(Scanned::Dir { name, meta, dir: d }),
                Ok(Err(e)) => errors.push((p, e.to_string())),
                Err(_) => errors.push((p, "the walker thread panicked".into())),
            },
        }
    }
    Ok(ScanDir {
        meta,
        entries,
        errors,
        left_out,
        left_out_total,
    })
}

/// Numbers files depth-first and groups hard links (the first link of an inode is read; later
/// ones reuse its chunks).
fn number(d: ScanDir, w: &mut Walk, links: &mut HashMap<(u64, u64), (usize, u64)>) -> Dir {
    w.errors.extend(d.errors);
    let room = LEFT_OUT_SHOWN.saturating_sub(w.left_out.len());
    w.left_out.extend(d.left_out.into_iter().take(room));
    w.left_out_total += d.left_out_total;
    let mut dir = Dir {
        meta: d.meta,
        entries: Vec::with_capacity(d.entries.len()),
    };
    for e in d.entries {
        match e {
            Scanned::Dir {
                name,
                meta,
                dir: sub,
            } => {
                let sub = number(sub, w, links);
                dir.entries.push(Entry::Dir {
                    name,
                    meta,
                    dir: Box::new(sub),
                });
            }
            Scanned::Symlink { name, meta, target } => {
                dir.entries.push(Entry::Symlink { name, meta, target });
            }
            Scanned::File {
                name,
                meta,
                path,
                nlink,
            } => {
                let mut group = 0;
                let mut same_as = None;
                if nlink > 1 {
                    let key = (meta.dev, meta.inode);
                    if let Some(&(first, g)) = links.get(&key) {
                        same_as = Some(first);
                        group = g;
                    } else {
                        group = links.len() as u64 + 1;
                        links.insert(key, (w.files.len(), group));
                    }
                }
                if same_as.is_none() {
                    w.bytes += meta.size;
                }
                w.files.push(FileJob {
                    path,
                    size: meta.size,
                    same_as,
                });
                dir.entries.push(Entry::File {
                    name,
                    meta,
                    file: w.files.len() - 1,
                    hardlink_group: group,
                });
            }
        }
    }
    dir
}
