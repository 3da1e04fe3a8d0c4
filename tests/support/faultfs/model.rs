//! The file system's state and what a power cut leaves of it, without FUSE (unit-tested here).
//!
//! Two views are kept of everything:
//! - **current**: what reads see (the page cache of a real kernel);
//! - **durable**: what a power cut at this instant could not take away.
//!
//! File data: each file keeps its durable bytes and the operations since its last successful
//! `fsync`/`fdatasync` (`pending`). A successful sync applies them to the durable bytes; a
//! *failed* sync drops them from `pending` without applying them (Linux marks the dirty pages
//! clean after a writeback error: a later successful `fsync` does not bring them back).
//!
//! Names: every link, unlink and rename is appended to one ordered log of metadata operations
//! (a journal). `fsync` of a directory makes every logged operation touching that directory
//! durable; `fsync` of a file does **not** make its name durable (POSIX; stricter than ext4).
//! After a crash the log survives as: every durable operation, plus a random prefix of it.
//!
//! What survives of a file's pending data is chosen per file: nothing, a prefix of the
//! operations, or a prefix and then one write torn at 512-byte sector granularity.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use rand::Rng;

/// Sector size for torn writes: a write is atomic per sector, not as a whole.
pub const SECTOR: u64 = 512;

/// Inode number of the root directory (FUSE's).
pub const ROOT: u64 = 1;

/// One change to a file's bytes.
#[derive(Clone, Debug)]
pub enum DataOp {
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
}

impl DataOp {
    fn apply(&self, to: &mut Vec<u8>) {
        match self {
            DataOp::Write { off, data } => {
                let off = usize::try_from(*off).expect("offsets fit in memory");
                if to.len() < off + data.len() {
                    to.resize(off + data.len(), 0);
                }
                to[off..off + data.len()].copy_from_slice(data);
            }
            DataOp::SetLen(len) => to.resize(usize::try_from(*len).expect("fits"), 0),
        }
    }
}

/// A regular file's bytes, current and durable.
#[derive(Clone, Debug, Default)]
pub struct FileData {
    pub data: Vec<u8>,
    pub durable: Vec<u8>,
    pub pending: Vec<DataOp>,
}

impl FileData {
    pub fn apply(&mut self, op: DataOp) {
        op.apply(&mut self.data);
        self.pending.push(op);
    }

    /// A successful sync.
    pub fn sync(&mut self) {
        for op in self.pending.drain(..) {
            op.apply(&mut self.durable);
        }
    }

    /// A failed sync: the pending operations will never be durable.
    pub fn lose_pending(&mut self) {
        self.pending.clear();
    }

    /// What a power cut leaves: durable bytes plus a random part of what is pending.
    fn after_crash(&self, rng: &mut impl Rng) -> (Vec<u8>, &'static str) {
        let mut out = self.durable.clone();
        if self.pending.is_empty() {
            return (out, "synced");
        }
        match rng.gen_range(0..3) {
            0 => (out, "dropped"),
            1 => {
                let k = rng.gen_range(0..=self.pending.len());
                for op in &self.pending[..k] {
                    op.apply(&mut out);
                }
                (out, "partly kept")
            }
            _ => {
                let k = rng.gen_range(0..self.pending.len());
                for op in &self.pending[..k] {
                    op.apply(&mut out);
                }
                match &self.pending[k] {
                    DataOp::Write { off, data } => {
                        // Some sectors of the write reach the disk, others do not.
                        let mut s = 0u64;
                        while s < data.len() as u64 {
                            let end = (s + SECTOR - (off + s) % SECTOR).min(data.len() as u64);
                            if rng.gen_bool(0.5) {
                                let (a, b) = (usize_of(s), usize_of(end));
                                DataOp::Write {
                                    off: off + s,
                                    data: data[a..b].to_vec(),
                                }
                                .apply(&mut out);
                            }
                            s = end;
                        }
                    }
                    op @ DataOp::SetLen(_) => {
                        if rng.gen_bool(0.5) {
                            op.apply(&mut out);
                        }
                    }
                }
                (out, "torn")
            }
        }
    }
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).expect("fits")
}

/// What an inode is.
#[derive(Clone, Debug)]
pub enum Kind {
    File(FileData),
    Dir {
        entries: BTreeMap<OsString, u64>,
        /// Entries as of the start of the metadata log.
        base: BTreeMap<OsString, u64>,
    },
    Symlink(OsString),
    /// Sockets and FIFOs (the admin socket): no data.
    Special(fuser::FileType),
}

impl Kind {
    /// A directory with no entries.
    #[must_use]
    pub fn empty_dir() -> Self {
        Kind::Dir {
            entries: BTreeMap::new(),
            base: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Inode {
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub nlink: u32,
    pub mtime: SystemTime,
    pub atime: SystemTime,
    pub ctime: SystemTime,
    /// The directory and name of its latest link (for paths in reports and fault matching).
    pub parent: u64,
    pub name: OsString,
}

impl Inode {
    #[must_use]
    pub fn new(kind: Kind, perm: u16, parent: u64, name: &OsStr) -> Self {
        let now = SystemTime::now();
        Self {
            kind,
            perm,
            uid: 0,
            gid: 0,
            rdev: 0,
            nlink: 1,
            mtime: now,
            atime: now,
            ctime: now,
            parent,
            name: name.to_os_string(),
        }
    }

    #[must_use]
    pub fn file_type(&self) -> fuser::FileType {
        match &self.kind {
            Kind::File(_) => fuser::FileType::RegularFile,
            Kind::Dir { .. } => fuser::FileType::Directory,
            Kind::Symlink(_) => fuser::FileType::Symlink,
            Kind::Special(t) => *t,
        }
    }

    #[must_use]
    pub fn size(&self) -> u64 {
        match &self.kind {
            Kind::File(f) => f.data.len() as u64,
            Kind::Symlink(t) => t.len() as u64,
            Kind::Dir { entries, .. } => entries.len() as u64,
            Kind::Special(_) => 0,
        }
    }
}

/// One logged name operation.
#[derive(Clone, Debug)]
pub enum MetaOp {
    Link {
        dir: u64,
        name: OsString,
        ino: u64,
    },
    Unlink {
        dir: u64,
        name: OsString,
    },
    Rename {
        from_dir: u64,
        from: OsString,
        to_dir: u64,
        to: OsString,
        ino: u64,
    },
}

impl MetaOp {
    fn touches(&self, d: u64) -> bool {
        match self {
            MetaOp::Link { dir, .. } | MetaOp::Unlink { dir, .. } => *dir == d,
            MetaOp::Rename {
                from_dir, to_dir, ..
            } => *from_dir == d || *to_dir == d,
        }
    }

    fn apply(&self, dirs: &mut HashMap<u64, BTreeMap<OsString, u64>>) {
        match self {
            MetaOp::Link { dir, name, ino } => {
                dirs.entry(*dir).or_default().insert(name.clone(), *ino);
            }
            MetaOp::Unlink { dir, name } => {
                dirs.entry(*dir).or_default().remove(name);
            }
            MetaOp::Rename {
                from_dir,
                from,
                to_dir,
                to,
                ino,
            } => {
                dirs.entry(*from_dir).or_default().remove(from);
                dirs.entry(*to_dir).or_default().insert(to.clone(), *ino);
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Logged {
    op: MetaOp,
    durable: bool,
}

/// Counts of what a crash did, for the test's report.
#[derive(Clone, Debug, Default)]
pub struct CrashReport {
    /// Metadata operations that were not durable, and how many of them survived.
    pub meta_pending: usize,
    pub meta_kept: usize,
    /// Files by what happened to their unsynced data ("dropped", "partly kept", "torn").
    pub files: BTreeMap<&'static str, usize>,
}

/// The whole tree.
#[derive(Debug)]
pub struct Tree {
    pub inodes: HashMap<u64, Inode>,
    next_ino: u64,
    log: VecDeque<Logged>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    #[must_use]
    pub fn new() -> Self {
        let mut inodes = HashMap::new();
        let mut root = Inode::new(Kind::empty_dir(), 0o755, ROOT, OsStr::new(""));
        root.nlink = 2;
        inodes.insert(ROOT, root);
        Self {
            inodes,
            next_ino: ROOT + 1,
            log: VecDeque::new(),
        }
    }

    /// Bytes held by files that have a name now.
    #[must_use]
    pub fn used(&self) -> u64 {
        self.inodes
            .values()
            .filter(|i| i.nlink > 0)
            .map(|i| match &i.kind {
                Kind::File(f) => f.data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// The path of an inode by its latest links ("?" past an unlinked directory).
    #[must_use]
    pub fn path(&self, mut ino: u64) -> String {
        let mut parts = Vec::new();
        let mut guard = 0;
        while ino != ROOT && guard < 64 {
            let Some(i) = self.inodes.get(&ino) else {
                parts.push("?".to_string());
                break;
            };
            parts.push(i.name.to_string_lossy().into_owned());
            ino = i.parent;
            guard += 1;
        }
        parts.reverse();
        parts.join("/")
    }

    #[must_use]
    pub fn entries(&self, dir: u64) -> Option<&BTreeMap<OsString, u64>> {
        match &self.inodes.get(&dir)?.kind {
            Kind::Dir { entries, .. } => Some(entries),
            _ => None,
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Option<&mut BTreeMap<OsString, u64>> {
        match &mut self.inodes.get_mut(&dir)?.kind {
            Kind::Dir { entries, .. } => Some(entries),
            _ => None,
        }
    }

    #[must_use]
    pub fn lookup(&self, dir: u64, name: &OsStr) -> Option<u64> {
        self.entries(dir)?.get(name).copied()
    }

    /// Creates an inode and links it as `dir/name` (which must not exist).
    pub fn create(&mut self, dir: u64, name: &OsStr, kind: Kind, perm: u16) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        let is_dir = matches!(kind, Kind::Dir { .. });
        let mut inode = Inode::new(kind, perm, dir, name);
        if is_dir {
            inode.nlink = 2;
        }
        self.inodes.insert(ino, inode);
        self.link_name(dir, name, ino);
        ino
    }

    fn link_name(&mut self, dir: u64, name: &OsStr, ino: u64) {
        self.entries_mut(dir)
            .expect("a directory")
            .insert(name.to_os_string(), ino);
        self.log.push_back(Logged {
            op: MetaOp::Link {
                dir,
                name: name.to_os_string(),
                ino,
            },
            durable: false,
        });
    }

    /// A hard link.
    pub fn link(&mut self, ino: u64, dir: u64, name: &OsStr) {
        self.link_name(dir, name, ino);
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.nlink += 1;
        }
    }

    /// Removes `dir/name`; the inode stays (open files, and a crash may bring the name back).
    pub fn unlink(&mut self, dir: u64, name: &OsStr) -> Option<u64> {
        let ino = self.entries_mut(dir)?.remove(name)?;
        self.log.push_back(Logged {
            op: MetaOp::Unlink {
                dir,
                name: name.to_os_string(),
            },
            durable: false,
        });
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.nlink = i.nlink.saturating_sub(1);
            if matches!(i.kind, Kind::Dir { .. }) {
                i.nlink = 0;
            }
        }
        Some(ino)
    }

    /// Moves `from_dir/from` to `to_dir/to`, replacing what is there.
    pub fn rename(&mut self, from_dir: u64, from: &OsStr, to_dir: u64, to: &OsStr) -> Option<u64> {
        let ino = self.entries_mut(from_dir)?.remove(from)?;
        let replaced = self
            .entries_mut(to_dir)
            .expect("a directory")
            .insert(to.to_os_string(), ino);
        if let Some(r) = replaced.and_then(|r| self.inodes.get_mut(&r)) {
            r.nlink = r.nlink.saturating_sub(1);
        }
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.parent = to_dir;
            i.name = to.to_os_string();
        }
        self.log.push_back(Logged {
            op: MetaOp::Rename {
                from_dir,
                from: from.to_os_string(),
                to_dir,
                to: to.to_os_string(),
                ino,
            },
            durable: false,
        });
        Some(ino)
    }

    /// `fsync` of a directory: every logged operation touching it is durable.
    pub fn sync_dir(&mut self, dir: u64) {
        for l in &mut self.log {
            if l.op.touches(dir) {
                l.durable = true;
            }
        }
        // Fold the durable head of the log into the directories' bases.
        while self.log.front().is_some_and(|l| l.durable) {
            let l = self.log.pop_front().expect("checked");
            let mut dirs: HashMap<u64, BTreeMap<OsString, u64>> = HashMap::new();
            for d in dirs_of(&l.op) {
                if let Some(Kind::Dir { base, .. }) = self.inodes.get_mut(&d).map(|i| &mut i.kind) {
                    dirs.insert(d, std::mem::take(base));
                }
            }
            l.op.apply(&mut dirs);
            for (d, b) in dirs {
                if let Some(Kind::Dir { base, .. }) = self.inodes.get_mut(&d).map(|i| &mut i.kind) {
                    *base = b;
                }
            }
        }
    }

    /// Metadata operations not yet durable.
    #[must_use]
    pub fn unsynced_names(&self) -> usize {
        self.log.iter().filter(|l| !l.durable).count()
    }

    /// The tree a power cut at this instant leaves (randomly among what it could leave).
    pub fn after_crash(&self, rng: &mut impl Rng) -> (Tree, CrashReport) {
        let mut report = CrashReport::default();
        let cut = rng.gen_range(0..=self.log.len());
        let mut dirs: HashMap<u64, BTreeMap<OsString, u64>> = self
            .inodes
            .iter()
            .filter_map(|(ino, i)| match &i.kind {
                Kind::Dir { base, .. } => Some((*ino, base.clone())),
                _ => None,
            })
            .collect();
        for (k, l) in self.log.iter().enumerate() {
            if !l.durable {
                report.meta_pending += 1;
            }
            if l.durable || k < cut {
                if !l.durable {
                    report.meta_kept += 1;
                }
                l.op.apply(&mut dirs);
            }
        }
        // What is reachable from the root survives.
        let mut out = Tree {
            inodes: HashMap::new(),
            next_ino: self.next_ino,
            log: VecDeque::new(),
        };
        let mut links: HashMap<u64, u32> = HashMap::new();
        let mut todo = vec![(ROOT, ROOT, OsString::new())];
        while let Some((ino, parent, name)) = todo.pop() {
            *links.entry(ino).or_default() += 1;
            if out.inodes.contains_key(&ino) {
                continue;
            }
            let Some(old) = self.inodes.get(&ino) else {
                continue;
            };
            let mut inode = old.clone();
            inode.parent = parent;
            inode.name = name;
            match &mut inode.kind {
                Kind::Dir { entries, base } => {
                    let e = dirs.remove(&ino).unwrap_or_default();
                    for (n, child) in &e {
                        todo.push((*child, ino, n.clone()));
                    }
                    *entries = e.clone();
                    *base = e;
                }
                Kind::File(f) => {
                    let (data, what) = f.after_crash(rng);
                    if what != "synced" {
                        *report.files.entry(what).or_default() += 1;
                    }
                    *f = FileData {
                        data: data.clone(),
                        durable: data,
                        pending: Vec::new(),
                    };
                }
                Kind::Symlink(_) | Kind::Special(_) => {}
            }
            out.inodes.insert(ino, inode);
        }
        for (ino, i) in &mut out.inodes {
            i.nlink = if matches!(i.kind, Kind::Dir { .. }) {
                2
            } else {
                links.get(ino).copied().unwrap_or(1)
            };
        }
        (out, report)
    }
}

fn dirs_of(op: &MetaOp) -> Vec<u64> {
    match op {
        MetaOp::Link { dir, .. } | MetaOp::Unlink { dir, .. } => vec![*dir],
        MetaOp::Rename {
            from_dir, to_dir, ..
        } if from_dir == to_dir => vec![*from_dir],
        MetaOp::Rename {
            from_dir, to_dir, ..
        } => vec![*from_dir, *to_dir],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn file(t: &Tree, path: &[&str]) -> Option<Vec<u8>> {
        let mut ino = ROOT;
        for p in path {
            ino = t.lookup(ino, OsStr::new(p))?;
        }
        match &t.inodes.get(&ino)?.kind {
            Kind::File(f) => Some(f.data.clone()),
            _ => None,
        }
    }

    fn write(t: &mut Tree, ino: u64, off: u64, data: &[u8]) {
        if let Some(Kind::File(f)) = t.inodes.get_mut(&ino).map(|i| &mut i.kind) {
            f.apply(DataOp::Write {
                off,
                data: data.to_vec(),
            });
        }
    }

    fn fsync(t: &mut Tree, ino: u64, ok: bool) {
        if let Some(Kind::File(f)) = t.inodes.get_mut(&ino).map(|i| &mut i.kind) {
            if ok {
                f.sync();
            } else {
                f.lose_pending();
            }
        }
    }

    fn new_file(t: &mut Tree, dir: u64, name: &str) -> u64 {
        t.create(
            dir,
            OsStr::new(name),
            Kind::File(FileData::default()),
            0o644,
        )
    }

    fn crashes(t: &Tree) -> Vec<Tree> {
        (0..64)
            .map(|s| t.after_crash(&mut rand::rngs::StdRng::seed_from_u64(s)).0)
            .collect()
    }

    #[test]
    fn synced_data_and_names_always_survive_and_nothing_else_is_promised() {
        let mut t = Tree::new();
        let d = t.create(ROOT, OsStr::new("d"), Kind::empty_dir(), 0o755);
        t.sync_dir(ROOT);
        let f = new_file(&mut t, d, "f");
        write(&mut t, f, 0, b"durable");
        fsync(&mut t, f, true);
        t.sync_dir(d);
        write(&mut t, f, 7, &[7u8; 2000]);
        let all = crashes(&t);
        for c in &all {
            let got = file(c, &["d", "f"]).expect("a synced name survives");
            assert_eq!(&got[..7], b"durable");
            assert!((7..=2007).contains(&got.len()), "{}", got.len());
            assert!(got[7..].iter().all(|b| *b == 7 || *b == 0));
        }
        // Each outcome of the unsynced write happens: dropped, kept whole, torn.
        let lens: std::collections::HashSet<usize> = all
            .iter()
            .map(|c| file(c, &["d", "f"]).unwrap())
            .map(|g| g.iter().filter(|b| **b == 7).map(|_| 1).sum::<usize>())
            .collect();
        assert!(lens.contains(&0) && lens.contains(&2000), "{lens:?}");
        assert!(lens.iter().any(|n| *n > 0 && *n < 2000), "{lens:?}");
    }

    #[test]
    fn a_name_needs_its_directory_synced_not_the_file() {
        let mut t = Tree::new();
        let f = new_file(&mut t, ROOT, "f");
        write(&mut t, f, 0, b"x");
        fsync(&mut t, f, true);
        let all = crashes(&t);
        assert!(all.iter().any(|c| file(c, &["f"]).is_none()));
        assert!(all.iter().any(|c| file(c, &["f"]).is_some()));
        t.sync_dir(ROOT);
        assert!(crashes(&t)
            .iter()
            .all(|c| file(c, &["f"]) == Some(b"x".to_vec())));
    }

    #[test]
    fn a_new_subdirectory_is_lost_unless_its_parent_is_synced() {
        let mut t = Tree::new();
        let d = t.create(ROOT, OsStr::new("d"), Kind::empty_dir(), 0o755);
        let f = new_file(&mut t, d, "f");
        fsync(&mut t, f, true);
        t.sync_dir(d);
        assert!(crashes(&t).iter().any(|c| file(c, &["d", "f"]).is_none()));
        t.sync_dir(ROOT);
        assert!(crashes(&t).iter().all(|c| file(c, &["d", "f"]).is_some()));
    }

    #[test]
    fn after_a_failed_fsync_the_lost_writes_never_come_back() {
        let mut t = Tree::new();
        let f = new_file(&mut t, ROOT, "f");
        t.sync_dir(ROOT);
        write(&mut t, f, 0, b"first");
        fsync(&mut t, f, false);
        write(&mut t, f, 5, b"second");
        fsync(&mut t, f, true);
        // Reads still see both (the page cache), but a crash leaves a hole where "first" was.
        assert_eq!(file(&t, &["f"]).unwrap(), b"firstsecond");
        for c in crashes(&t) {
            assert_eq!(file(&c, &["f"]).unwrap(), b"\0\0\0\0\0second");
        }
    }

    #[test]
    fn a_rename_over_a_synced_name_leaves_one_or_the_other() {
        let mut t = Tree::new();
        let old = new_file(&mut t, ROOT, "CURRENT");
        write(&mut t, old, 0, b"old");
        fsync(&mut t, old, true);
        t.sync_dir(ROOT);
        let tmp = new_file(&mut t, ROOT, "tmp");
        write(&mut t, tmp, 0, b"new");
        fsync(&mut t, tmp, true);
        t.rename(ROOT, OsStr::new("tmp"), ROOT, OsStr::new("CURRENT"));
        let seen: std::collections::HashSet<Vec<u8>> = crashes(&t)
            .iter()
            .map(|c| file(c, &["CURRENT"]).expect("never lost"))
            .collect();
        assert_eq!(seen.len(), 2, "{seen:?}");
        t.sync_dir(ROOT);
        for c in crashes(&t) {
            assert_eq!(file(&c, &["CURRENT"]).unwrap(), b"new");
            assert!(file(&c, &["tmp"]).is_none());
        }
        // Folded into the directory's durable state, the rename keeps every other name.
        assert!(t.unsynced_names() == 0);
        let other = new_file(&mut t, ROOT, "other");
        fsync(&mut t, other, true);
        t.sync_dir(ROOT);
        for c in crashes(&t) {
            assert!(file(&c, &["CURRENT"]).is_some() && file(&c, &["other"]).is_some());
        }
    }
}
