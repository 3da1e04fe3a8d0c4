//! The walk stage: stat the tree, remember what each directory holds, and list the regular files
//! whose contents must be read. Symlinks are recorded, never followed.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
    pub bytes: u64,
}

/// Walks `root` (a directory).
///
/// # Errors
/// When `root` itself cannot be read.
pub fn walk(root: &Path) -> Result<Walk, String> {
    let meta = std::fs::symlink_metadata(root).map_err(|e| format!("{}: {e}", root.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", root.display()));
    }
    let mut w = Walk::default();
    let mut links: HashMap<(u64, u64), (usize, u64)> = HashMap::new();
    let dir = walk_dir(root, Meta::of(&meta), &mut w, &mut links)?;
    w.root = dir;
    Ok(w)
}

fn walk_dir(
    path: &Path,
    meta: Meta,
    w: &mut Walk,
    links: &mut HashMap<(u64, u64), (usize, u64)>,
) -> Result<Dir, String> {
    let rd = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut names: Vec<std::ffi::OsString> = Vec::new();
    for e in rd {
        match e {
            Ok(e) => names.push(e.file_name()),
            Err(e) => w.errors.push((path.to_path_buf(), e.to_string())),
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let mut dir = Dir {
        meta,
        entries: Vec::with_capacity(names.len()),
    };
    for name in names {
        let p = path.join(&name);
        let raw = OsStr::as_bytes(&name).to_vec();
        let m = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) => {
                w.errors.push((p, e.to_string()));
                continue;
            }
        };
        let ft = m.file_type();
        let meta = Meta::of(&m);
        if ft.is_dir() {
            match walk_dir(&p, meta.clone(), w, links) {
                Ok(d) => dir.entries.push(Entry::Dir {
                    name: raw,
                    meta,
                    dir: Box::new(d),
                }),
                Err(e) => w.errors.push((p, e)),
            }
        } else if ft.is_symlink() {
            match std::fs::read_link(&p) {
                Ok(t) => dir.entries.push(Entry::Symlink {
                    name: raw,
                    meta,
                    target: t.as_os_str().as_bytes().to_vec(),
                }),
                Err(e) => w.errors.push((p, e.to_string())),
            }
        } else if ft.is_file() {
            let mut group = 0;
            let mut same_as = None;
            if m.nlink() > 1 {
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
                path: p,
                size: meta.size,
                same_as,
            });
            dir.entries.push(Entry::File {
                name: raw,
                meta,
                file: w.files.len() - 1,
                hardlink_group: group,
            });
        } else {
            w.errors.push((
                p,
                "special files (devices, sockets, FIFOs) are not backed up".into(),
            ));
        }
    }
    Ok(dir)
}
