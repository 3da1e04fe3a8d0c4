//! A fault-injecting file system for power-loss and I/O-error tests (RELIABILITY C2–C4).
//!
//! `FaultFs` mounts an in-memory file system with FUSE. The appliance runs on it unchanged:
//! packs through glommio's io_uring O_DIRECT files, RocksDB through its POSIX `Env`, the catalog
//! journal, directory syncs. The file system keeps what is durable apart from what is merely
//! written (see [`model`]), so that [`FaultFs::power_cycle`] can drop unsynced data the way a
//! power cut does — wholly, partly or torn — which a process kill (the page cache survives)
//! cannot show.
//!
//! - **Crash points**: [`Control::crash_at`] arms a crash at the n-th mutating operation (write,
//!   truncate, allocate, sync, create, link, unlink, rename). From that operation on every request
//!   fails with `EIO` and its process is SIGKILLed: the machine is off. [`Control::wait_crashed`]
//!   tells the test; [`FaultFs::power_cycle`] unmounts, computes what survived and mounts that.
//! - **Faults** ([`Control::fail`]): the next matching operations fail with an errno (`EIO` from
//!   `fsync`, `ENOSPC` from `write`, …); a failed sync loses the pending writes for good.
//! - **Space**: [`Control::set_capacity`] sets the size `statfs` reports; writes past it fail
//!   with `ENOSPC`.
//! - **Coverage**: every mutating operation is classified (`fsync packs/<xx>/<pack>`,
//!   `write index/<shard>/<wal>`, …) and counted, so a test can show each class was a crash
//!   point at least once (C3).

pub mod model;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use libc::{c_int, EEXIST, EINVAL, EIO, EISDIR, ENOENT, ENOSPC, ENOTDIR, ENOTEMPTY, EOPNOTSUPP};
use rand::SeedableRng;

use model::{CrashReport, DataOp, FileData, Kind, Tree, ROOT};

/// How long the kernel may cache names and attributes: only this mount changes the tree, and a
/// power cycle mounts afresh.
const TTL: Duration = Duration::from_secs(1);
const BLOCK: u32 = 4096;

/// A mutating operation, for crash points, faults and coverage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Write,
    Truncate,
    Allocate,
    Fsync,
    FsyncDir,
    Create,
    Mkdir,
    Link,
    Unlink,
    Rename,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Truncate => "truncate",
            Op::Allocate => "allocate",
            Op::Fsync => "fsync",
            Op::FsyncDir => "fsyncdir",
            Op::Create => "create",
            Op::Mkdir => "mkdir",
            Op::Link => "link",
            Op::Unlink => "unlink",
            Op::Rename => "rename",
        }
    }
}

/// An injected failure: the next `times` operations `op` on a path containing `path` fail with
/// `errno`.
#[derive(Clone, Debug)]
pub struct Fault {
    pub op: Op,
    pub path: String,
    pub errno: c_int,
    pub times: u32,
}

#[derive(Debug)]
struct State {
    tree: Tree,
    /// Incremented by every power cycle: requests from an older mount's session fail.
    epoch: u64,
    ops: u64,
    crash_at: Option<u64>,
    /// A crash at the n-th operation of a class (since the mount).
    crash_class: Option<(String, u64)>,
    dead: bool,
    /// The class of the operation the crash hit.
    crashed_in: Option<String>,
    faults: Vec<Fault>,
    /// Faults that fired: (operation, path).
    fired: Vec<(Op, String)>,
    capacity: u64,
    /// Mutating operations by class, since the mount.
    classes: BTreeMap<String, u64>,
    /// Writes by path, since the mount (to show a poisoned pack is never written again).
    writes: HashMap<String, u64>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The test's handle on the file system's switches.
#[derive(Clone)]
pub struct Control(Arc<Shared>);

impl Control {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Mutating operations so far in this mount.
    #[must_use]
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Arms a crash at the `n`-th mutating operation of this mount (counting from its start).
    pub fn crash_at(&self, n: u64) {
        self.lock().crash_at = Some(n);
    }

    /// Arms a crash at the `nth` operation of `class` (see [`classify`]) from now on.
    pub fn crash_at_class(&self, class: &str, nth: u64) {
        let mut s = self.lock();
        let seen = s.classes.get(class).copied().unwrap_or(0);
        s.crash_class = Some((class.to_string(), seen + nth));
    }

    /// Disarms the crash points.
    pub fn disarm(&self) {
        let mut s = self.lock();
        s.crash_at = None;
        s.crash_class = None;
    }

    /// Cuts the power now (the next operation, and every one after it, fails).
    pub fn crash_now(&self) {
        let mut s = self.lock();
        if !s.dead {
            s.dead = true;
            s.crashed_in
                .get_or_insert_with(|| "(after the workload)".into());
        }
        self.0.changed.notify_all();
    }

    /// Whether the crash point was reached.
    #[must_use]
    pub fn crashed(&self) -> bool {
        self.lock().dead
    }

    /// Waits until the crash point is reached or `limit` passes; whether it was.
    #[must_use]
    pub fn wait_crashed(&self, limit: Duration) -> bool {
        let s = self.lock();
        let (s, _) = self
            .0
            .changed
            .wait_timeout_while(s, limit, |s| !s.dead)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.dead
    }

    /// The class of the operation the last crash hit.
    #[must_use]
    pub fn crashed_in(&self) -> Option<String> {
        self.lock().crashed_in.clone()
    }

    /// Adds an injected failure.
    pub fn fail(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Faults that fired since the mount: (operation, path).
    #[must_use]
    pub fn fired(&self) -> Vec<(Op, String)> {
        self.lock().fired.clone()
    }

    /// Sets the file system's size.
    pub fn set_capacity(&self, bytes: u64) {
        self.lock().capacity = bytes;
    }

    /// Bytes held by files.
    #[must_use]
    pub fn used(&self) -> u64 {
        self.lock().tree.used()
    }

    /// Mutating operations by class since the mount.
    #[must_use]
    pub fn classes(&self) -> BTreeMap<String, u64> {
        self.lock().classes.clone()
    }

    /// Writes to `path` (relative to the mount) since the mount.
    #[must_use]
    pub fn writes_to(&self, path: &str) -> u64 {
        self.lock().writes.get(path).copied().unwrap_or(0)
    }

    /// Operations whose names are not durable yet.
    #[must_use]
    pub fn unsynced_names(&self) -> usize {
        self.lock().tree.unsynced_names()
    }
}

/// A mounted fault-injecting file system.
pub struct FaultFs {
    control: Control,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl std::fmt::Debug for FaultFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultFs")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl FaultFs {
    /// Mounts an empty file system of `capacity` bytes at `mountpoint` (an empty directory).
    ///
    /// # Errors
    /// When FUSE is not available (`/dev/fuse`, the mount itself).
    pub fn mount(mountpoint: &Path, capacity: u64) -> std::io::Result<Self> {
        let control = Control(Arc::new(Shared {
            state: Mutex::new(State {
                tree: Tree::new(),
                epoch: 0,
                ops: 0,
                crash_at: None,
                crash_class: None,
                dead: false,
                crashed_in: None,
                faults: Vec::new(),
                fired: Vec::new(),
                capacity,
                classes: BTreeMap::new(),
                writes: HashMap::new(),
            }),
            changed: Condvar::new(),
        }));
        let mut fs = Self {
            control,
            mountpoint: mountpoint.to_path_buf(),
            session: None,
        };
        fs.mount_epoch(0)?;
        Ok(fs)
    }

    fn mount_epoch(&mut self, epoch: u64) -> std::io::Result<()> {
        let driver = Driver {
            shared: self.control.0.clone(),
            epoch,
            own_pid: std::process::id(),
        };
        let session = fuser::spawn_mount2(
            driver,
            &self.mountpoint,
            &[
                MountOption::FSName("coffer-faultfs".into()),
                MountOption::RW,
                MountOption::NoAtime,
            ],
        )?;
        self.session = Some(session);
        Ok(())
    }

    #[must_use]
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Power loss and restart: nothing more reaches the disk, the file system is unmounted, what
    /// a power cut at this instant may leave is chosen with `seed`, and that is mounted. Every
    /// process using the file system must be dead already (the test kills the appliance).
    ///
    /// # Errors
    /// When the new mount fails.
    pub fn power_cycle(&mut self, seed: u64) -> std::io::Result<CrashReport> {
        {
            let mut s = self.control.lock();
            s.dead = true;
            s.epoch += 1;
        }
        self.unmount();
        let (epoch, report) = {
            let mut s = self.control.lock();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let (tree, report) = s.tree.after_crash(&mut rng);
            s.tree = tree;
            s.dead = false;
            s.ops = 0;
            s.crash_at = None;
            s.crash_class = None;
            s.crashed_in = None;
            s.faults.clear();
            s.fired.clear();
            s.classes.clear();
            s.writes.clear();
            (s.epoch, report)
        };
        self.mount_epoch(epoch)?;
        Ok(report)
    }
}

impl FaultFs {
    /// A lazy unmount (no process can keep it busy), then the session ends when the kernel lets
    /// go of it; its late requests see a stale epoch and fail. (fuser's own unmount is a plain
    /// one, which fails while a killed process still holds a file.)
    fn unmount(&mut self) {
        if self.session.is_some() {
            if let Err(e) =
                rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH)
            {
                eprintln!("faultfs: unmounting {}: {e}", self.mountpoint.display());
            }
            drop(self.session.take());
        }
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        self.control.lock().dead = true;
        self.unmount();
    }
}

/// The class of an operation on `path`: names that vary (pack ids, RocksDB file numbers) are
/// replaced by what they are.
#[must_use]
#[allow(clippy::case_sensitive_file_extension_comparisons)] // RocksDB's names are lower case
pub fn classify(op: Op, path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let n = parts.len();
    let mut out = Vec::with_capacity(n);
    for (k, p) in parts.iter().enumerate() {
        let hex = p.chars().all(|c| c.is_ascii_hexdigit());
        let last = k + 1 == n;
        let class = if hex && p.len() == 2 && k > 0 && parts[k - 1] == "packs" {
            "<xx>".to_string()
        } else if hex && p.len() >= 16 {
            "<id>".to_string()
        } else if p.starts_with("shard-") {
            "<shard>".to_string()
        } else if last && p.ends_with(".log") {
            "<wal>".to_string()
        } else if last && p.ends_with(".sst") {
            "<sst>".to_string()
        } else if last && p.starts_with("MANIFEST") {
            "<manifest>".to_string()
        } else if last && p.starts_with("OPTIONS") {
            "<options>".to_string()
        } else if last && (p.ends_with(".dbtmp") || p.ends_with(".tmp")) {
            "<tmp>".to_string()
        } else if last && p.contains(".old") {
            "<old>".to_string()
        } else if last && p.ends_with(".journal") {
            "<journal>".to_string()
        } else {
            (*p).to_string()
        };
        out.push(class);
    }
    format!("{} {}", op.name(), out.join("/"))
}

/// The FUSE side: one per mount.
struct Driver {
    shared: Arc<Shared>,
    epoch: u64,
    own_pid: u32,
}

fn time_of(t: Option<TimeOrNow>) -> Option<SystemTime> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    })
}

impl Driver {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Kills the process behind a request made after the power went out. FUSE names the
    /// requesting thread; its thread group is the process (never this test process).
    fn stop(&self, tid: u32) {
        let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap_or_default();
        let Some(pid) = status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            return;
        };
        if pid == self.own_pid {
            return;
        }
        if let Some(p) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            // A stale pid is at worst ESRCH.
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }

    /// Any request: fails when the power is out (or this mount is stale).
    fn alive(&self, s: &State, req: &Request<'_>) -> Result<(), c_int> {
        if s.dead || s.epoch != self.epoch {
            self.stop(req.pid());
            return Err(EIO);
        }
        Ok(())
    }

    /// A mutating request on `ino` (or on `dir/name`): counts it, reaches the crash point, fires
    /// faults.
    fn gate(&self, s: &mut State, req: &Request<'_>, op: Op, path: &str) -> Result<(), c_int> {
        self.alive(s, req)?;
        s.ops += 1;
        let class = classify(op, path);
        let nth_of_class = s.classes.get(&class).copied().unwrap_or(0) + 1;
        let class_hit = s
            .crash_class
            .as_ref()
            .is_some_and(|(c, n)| *c == class && nth_of_class >= *n);
        if class_hit || s.crash_at.is_some_and(|n| s.ops >= n) {
            s.dead = true;
            s.crashed_in = Some(class);
            self.shared.changed.notify_all();
            self.stop(req.pid());
            return Err(EIO);
        }
        *s.classes.entry(class).or_default() += 1;
        if op == Op::Write {
            *s.writes.entry(path.to_string()).or_default() += 1;
        }
        if let Some(f) = s
            .faults
            .iter_mut()
            .find(|f| f.times > 0 && f.op == op && path.contains(&f.path))
        {
            f.times -= 1;
            let errno = f.errno;
            s.fired.push((op, path.to_string()));
            return Err(errno);
        }
        Ok(())
    }

    fn attr(s: &State, ino: u64) -> Option<FileAttr> {
        let i = s.tree.inodes.get(&ino)?;
        let size = i.size();
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            crtime: i.ctime,
            kind: i.file_type(),
            perm: i.perm,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev,
            blksize: BLOCK,
            flags: 0,
        })
    }

    fn child_path(s: &State, dir: u64, name: &OsStr) -> String {
        let base = s.tree.path(dir);
        if base.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{base}/{}", name.to_string_lossy())
        }
    }

    /// Changes a file's bytes, within the capacity.
    fn change(s: &mut State, ino: u64, op: DataOp) -> Result<(), c_int> {
        let used = s.tree.used();
        let cap = s.capacity;
        let Some(i) = s.tree.inodes.get_mut(&ino) else {
            return Err(ENOENT);
        };
        let Kind::File(f) = &mut i.kind else {
            return Err(EISDIR);
        };
        let old = f.data.len() as u64;
        let new = match &op {
            DataOp::Write { off, data } => old.max(off + data.len() as u64),
            DataOp::SetLen(l) => *l,
        };
        if new > old && used + (new - old) > cap {
            return Err(ENOSPC);
        }
        f.apply(op);
        i.mtime = SystemTime::now();
        i.ctime = i.mtime;
        Ok(())
    }

    fn make(
        &self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        kind: Kind,
        perm: u16,
        op: Op,
    ) -> Result<FileAttr, c_int> {
        let mut s = self.lock();
        let path = Self::child_path(&s, parent, name);
        self.gate(&mut s, req, op, &path)?;
        if s.tree.entries(parent).is_none() {
            return Err(ENOTDIR);
        }
        if s.tree.lookup(parent, name).is_some() {
            return Err(EEXIST);
        }
        let ino = s.tree.create(parent, name, kind, perm);
        if let Some(i) = s.tree.inodes.get_mut(&ino) {
            i.uid = req.uid();
            i.gid = req.gid();
        }
        Self::attr(&s, ino).ok_or(EIO)
    }
}

/// Answers an operation that returns nothing.
fn empty(reply: ReplyEmpty, res: Result<(), c_int>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn perm_of(mode: u32, umask: u32) -> u16 {
    u16::try_from(mode & !umask & 0o7777).unwrap_or(0o644)
}

impl Filesystem for Driver {
    fn init(&mut self, _req: &Request<'_>, config: &mut fuser::KernelConfig) -> Result<(), c_int> {
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let s = self.lock();
        if let Err(e) = self.alive(&s, req) {
            return reply.error(e);
        }
        match s.tree.lookup(parent, name).and_then(|i| Self::attr(&s, i)) {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(ENOENT),
        }
    }

    fn getattr(&mut self, req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let s = self.lock();
        if let Err(e) = self.alive(&s, req) {
            return reply.error(e);
        }
        match Self::attr(&s, ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(ENOENT),
        }
    }

    fn setattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut s = self.lock();
        if let Some(len) = size {
            let path = s.tree.path(ino);
            if let Err(e) = self.gate(&mut s, req, Op::Truncate, &path) {
                return reply.error(e);
            }
            if let Err(e) = Self::change(&mut s, ino, DataOp::SetLen(len)) {
                return reply.error(e);
            }
        } else if let Err(e) = self.alive(&s, req) {
            return reply.error(e);
        }
        let Some(i) = s.tree.inodes.get_mut(&ino) else {
            return reply.error(ENOENT);
        };
        if let Some(m) = mode {
            i.perm = u16::try_from(m & 0o7777).unwrap_or(i.perm);
        }
        if let Some(u) = uid {
            i.uid = u;
        }
        if let Some(g) = gid {
            i.gid = g;
        }
        if let Some(t) = time_of(atime) {
            i.atime = t;
        }
        if let Some(t) = time_of(mtime) {
            i.mtime = t;
        }
        i.ctime = SystemTime::now();
        match Self::attr(&s, ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(ENOENT),
        }
    }

    fn readlink(&mut self, req: &Request<'_>, ino: u64, reply: ReplyData) {
        let s = self.lock();
        if let Err(e) = self.alive(&s, req) {
            return reply.error(e);
        }
        match s.tree.inodes.get(&ino).map(|i| &i.kind) {
            Some(Kind::Symlink(t)) => reply.data(t.as_encoded_bytes()),
            _ => reply.error(EINVAL),
        }
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File(FileData::default()),
            libc::S_IFSOCK => Kind::Special(FileType::Socket),
            libc::S_IFIFO => Kind::Special(FileType::NamedPipe),
            _ => return reply.error(EOPNOTSUPP),
        };
        match self.make(req, parent, name, kind, perm_of(mode, umask), Op::Create) {
            Ok(mut a) => {
                a.rdev = rdev;
                reply.entry(&TTL, &a, 0);
            }
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let kind = Kind::empty_dir();
        match self.make(req, parent, name, kind, perm_of(mode, umask), Op::Mkdir) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let path = Self::child_path(&s, parent, name);
        if let Err(e) = self.gate(&mut s, req, Op::Unlink, &path) {
            return reply.error(e);
        }
        match s.tree.lookup(parent, name) {
            Some(ino) if s.tree.entries(ino).is_some() => reply.error(EISDIR),
            Some(_) => {
                s.tree.unlink(parent, name);
                reply.ok();
            }
            None => reply.error(ENOENT),
        }
    }

    fn rmdir(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let path = Self::child_path(&s, parent, name);
        if let Err(e) = self.gate(&mut s, req, Op::Unlink, &path) {
            return reply.error(e);
        }
        match s.tree.lookup(parent, name) {
            Some(ino) => match s.tree.entries(ino) {
                None => reply.error(ENOTDIR),
                Some(e) if !e.is_empty() => reply.error(ENOTEMPTY),
                Some(_) => {
                    s.tree.unlink(parent, name);
                    reply.ok();
                }
            },
            None => reply.error(ENOENT),
        }
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let kind = Kind::Symlink(target.as_os_str().to_os_string());
        match self.make(req, parent, link_name, kind, 0o777, Op::Create) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let path = Self::child_path(&s, newparent, newname);
        if let Err(e) = self.gate(&mut s, req, Op::Rename, &path) {
            return reply.error(e);
        }
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return reply.error(EINVAL);
        }
        let Some(src) = s.tree.lookup(parent, name) else {
            return reply.error(ENOENT);
        };
        if let Some(dst) = s.tree.lookup(newparent, newname) {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return reply.error(EEXIST);
            }
            let src_dir = s.tree.entries(src).is_some();
            match s.tree.entries(dst) {
                Some(e) if !src_dir => {
                    return reply.error(if e.is_empty() { EISDIR } else { ENOTEMPTY })
                }
                Some(e) if !e.is_empty() => return reply.error(ENOTEMPTY),
                None if src_dir => return reply.error(ENOTDIR),
                _ => {}
            }
        }
        s.tree.rename(parent, name, newparent, newname);
        reply.ok();
    }

    fn link(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let path = Self::child_path(&s, newparent, newname);
        if let Err(e) = self.gate(&mut s, req, Op::Link, &path) {
            return reply.error(e);
        }
        if s.tree.lookup(newparent, newname).is_some() {
            return reply.error(EEXIST);
        }
        s.tree.link(ino, newparent, newname);
        match Self::attr(&s, ino) {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(ENOENT),
        }
    }

    fn open(&mut self, req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let mut s = self.lock();
        if let Err(e) = self.alive(&s, req) {
            return reply.error(e);
        }
        if flags & libc::O_TRUNC != 0 {
            let path = s.tree.path(ino);
            if let Err(e) = self
                .gate(&mut s, req, Op::Truncate, &path)
                .and_then(|()| Self::change(&mut s, ino, DataOp::SetLen(0)))
            {
                return reply.error(e);
            }
        }
        if s.tree.inodes.contains_key(&ino) {
            reply.opened(0, 0);
        } else {
            reply.error(ENOENT);
        }
    }

    fn read(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let s = self.lock();
        if let Err(e) = self.alive(&s, req) {
            return reply.error(e);
        }
        match s.tree.inodes.get(&ino).map(|i| &i.kind) {
            Some(Kind::File(f)) => {
                let off = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(f.data.len());
                let end = off.saturating_add(size as usize).min(f.data.len());
                reply.data(&f.data[off..end]);
            }
            Some(_) => reply.error(EISDIR),
            None => reply.error(ENOENT),
        }
    }

    fn write(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut s = self.lock();
        let path = s.tree.path(ino);
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(EINVAL);
        };
        let res = self.gate(&mut s, req, Op::Write, &path).and_then(|()| {
            Self::change(
                &mut s,
                ino,
                DataOp::Write {
                    off,
                    data: data.to_vec(),
                },
            )
        });
        match res {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, req: &Request<'_>, _ino: u64, _fh: u64, _lo: u64, reply: ReplyEmpty) {
        let s = self.lock();
        empty(reply, self.alive(&s, req));
    }

    fn fsync(&mut self, req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let mut s = self.lock();
        let path = s.tree.path(ino);
        let res = self.gate(&mut s, req, Op::Fsync, &path);
        let power_out = s.dead;
        if let Some(Kind::File(f)) = s.tree.inodes.get_mut(&ino).map(|i| &mut i.kind) {
            match res {
                Ok(()) => f.sync(),
                // A failed sync (an injected fault, not the power going out): the dirty data is
                // lost for good.
                Err(_) if !power_out => f.lose_pending(),
                Err(_) => {}
            }
        }
        empty(reply, res);
    }

    fn opendir(&mut self, req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let s = self.lock();
        if let Err(e) = self.alive(&s, req) {
            return reply.error(e);
        }
        if s.tree.entries(ino).is_some() {
            reply.opened(0, 0);
        } else {
            reply.error(ENOTDIR);
        }
    }

    fn readdir(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.lock();
        if let Err(e) = self.alive(&s, req) {
            return reply.error(e);
        }
        let Some(entries) = s.tree.entries(ino) else {
            return reply.error(ENOTDIR);
        };
        let parent = s.tree.inodes.get(&ino).map_or(ROOT, |i| i.parent);
        let mut all = vec![
            (ino, FileType::Directory, OsStr::new(".").to_os_string()),
            (parent, FileType::Directory, OsStr::new("..").to_os_string()),
        ];
        for (name, child) in entries {
            let t = s
                .tree
                .inodes
                .get(child)
                .map_or(FileType::RegularFile, model::Inode::file_type);
            all.push((*child, t, name.clone()));
        }
        let skip = usize::try_from(offset).unwrap_or(0);
        for (k, (i, t, name)) in all.into_iter().enumerate().skip(skip) {
            if reply.add(i, i64::try_from(k + 1).unwrap_or(i64::MAX), t, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let path = s.tree.path(ino);
        match self.gate(&mut s, req, Op::FsyncDir, &path) {
            Ok(()) => {
                s.tree.sync_dir(ino);
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&mut self, req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let s = self.lock();
        if let Err(e) = self.alive(&s, req) {
            return reply.error(e);
        }
        let blocks = s.capacity / u64::from(BLOCK);
        let free = s.capacity.saturating_sub(s.tree.used()) / u64::from(BLOCK);
        reply.statfs(blocks, free, free, 1 << 20, 1 << 20, BLOCK, 255, BLOCK);
    }

    fn access(&mut self, req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        let s = self.lock();
        empty(reply, self.alive(&s, req));
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        {
            // An existing file opened with O_CREAT (no O_EXCL): an open.
            let s = self.lock();
            if let Some(ino) = s.tree.lookup(parent, name) {
                let res = if flags & libc::O_EXCL != 0 {
                    Err(EEXIST)
                } else {
                    self.alive(&s, req)
                        .and_then(|()| Self::attr(&s, ino).ok_or(ENOENT))
                };
                return match res {
                    Ok(a) => reply.created(&TTL, &a, 0, 0, 0),
                    Err(e) => reply.error(e),
                };
            }
        }
        let kind = Kind::File(FileData::default());
        match self.make(req, parent, name, kind, perm_of(mode, umask), Op::Create) {
            Ok(a) => reply.created(&TTL, &a, 0, 0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let path = s.tree.path(ino);
        if let Err(e) = self.gate(&mut s, req, Op::Allocate, &path) {
            return reply.error(e);
        }
        let (Ok(off), Ok(len)) = (u64::try_from(offset), u64::try_from(length)) else {
            return reply.error(EINVAL);
        };
        let size = s.tree.inodes.get(&ino).map_or(0, model::Inode::size);
        let res = match mode {
            0 if off + len > size => Self::change(&mut s, ino, DataOp::SetLen(off + len)),
            0 => Ok(()),
            libc::FALLOC_FL_KEEP_SIZE => {
                // Space is reserved, not used: only refused when it is not there.
                let free = s.capacity.saturating_sub(s.tree.used());
                if (off + len).saturating_sub(size) > free {
                    Err(ENOSPC)
                } else {
                    Ok(())
                }
            }
            _ => Err(EOPNOTSUPP),
        };
        empty(reply, res);
    }
}
