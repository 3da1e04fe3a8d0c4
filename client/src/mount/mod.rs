//! `coffer mount`: the snapshots this user may read, as a read-only FUSE file system.
//!
//! ```text
//! MOUNTPOINT/hosts/<identity>/<local time>/…   one directory per snapshot, and `latest`
//! MOUNTPOINT/paths/<path, '/' as %2F>/<local time>/…
//! MOUNTPOINT/ids/<snapshot id>/…
//! ```
//!
//! * The views come from the appliance's snapshot list, read again when older than the refresh
//!   interval: a snapshot that becomes unreadable (a rule removed) leaves the listing, and its
//!   chunks are refused by the appliance as for `restore` (the same session calls).
//! * A directory is read part by part ([`tree`] parts, in name order): `readdir` and `lookup`
//!   read only as many parts as they need, each checked like restore's ([`decode_checked`]) and
//!   in strictly increasing name order across parts.
//! * A file is read chunk by chunk on demand. Trees do not record chunk sizes, so a file's
//!   chunk offsets are learnt as its chunks are read, in order, several at a time (read-ahead);
//!   chunks stay in a bounded cache ([`cache::ChunkCache`]), and with `--disk-cache` also on
//!   local disk, sealed under a key of this process ([`disk::DiskCache`]). Every request is
//!   answered from a
//!   task on the client's runtime, so readers of different files proceed in parallel.
//! * Sealed repositories decrypt locally: chunks come through the same [`Session::get`].
//!
//! Owns: inode numbers, attributes, the views. Must never write anything, anywhere: every
//! operation that would is refused by the kernel (`ro`) or not implemented.

mod cache;
mod disk;
mod table;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use coffer_proto::{ChunkId, SnapshotId};
use fuser::{
    FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen,
    ReplyStatfs, Request,
};

use crate::net::Session;
use crate::snapshot::node_chunk_ids;
use crate::ClientError;
use cache::ChunkCache;
use disk::DiskCache;
use table::{Kind, Table};

/// How a mount behaves.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Bytes of chunk plaintext kept in memory.
    pub cache_bytes: u64,
    /// How old the snapshot list may get before a view reads it again.
    pub refresh: Duration,
    /// A directory for the disk cache (off without one).
    pub disk_cache: Option<PathBuf>,
    /// Bytes of chunk files the disk cache holds at most.
    pub disk_cache_bytes: u64,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 256 << 20,
            refresh: Duration::from_secs(10),
            disk_cache: None,
            disk_cache_bytes: 2 << 30,
        }
    }
}

/// Chunks fetched together when a read reaches chunks not read yet (the kernel reads 128 KiB
/// at a time; chunks average about 1 MiB).
const READ_AHEAD: usize = 16;

/// What FUSE needs and the checks a clear error needs: `/dev/fuse`, and `fusermount3` unless
/// root.
///
/// # Errors
/// What is missing, and how to get it.
pub fn check_fuse() -> Result<(), ClientError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(ClientError::Mount(
            "FUSE is not available: /dev/fuse is missing (load the module with `modprobe fuse`; \
             in a container, pass --device /dev/fuse)"
                .into(),
        ));
    }
    let root = rustix::process::geteuid().is_root();
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()));
    if !root && !found {
        return Err(ClientError::Mount(
            "FUSE is not available: fusermount3 is not installed (apt install fuse3)".into(),
        ));
    }
    Ok(())
}

struct Inner {
    session: Session,
    rt: tokio::runtime::Handle,
    table: Mutex<Table>,
    cache: Mutex<ChunkCache>,
    disk: Option<Arc<DiskCache>>,
    opts: MountOptions,
    /// When the snapshot list was last read (held while it is read again).
    listed_at: tokio::sync::Mutex<Option<Instant>>,
    /// Snapshots this session opened (the appliance serves only their chunks).
    opened: tokio::sync::Mutex<std::collections::HashSet<SnapshotId>>,
    /// Open files: chunk ids and the offsets learnt so far.
    files: Mutex<std::collections::HashMap<u64, Arc<tokio::sync::Mutex<OpenFile>>>>,
    next_fh: std::sync::atomic::AtomicU64,
}

/// An open file: its chunks (for a bundled file, the bundle) and where each starts, as far as
/// known.
struct OpenFile {
    snap: SnapshotId,
    ids: Vec<ChunkId>,
    /// `starts[i]`: offset of chunk `i`; one more entry than chunks read in order so far.
    starts: Vec<u64>,
    /// A small file inside a bundle: its offset there.
    bundle_offset: Option<u64>,
    size: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A snapshot this user may no longer read (gone from the list since it was mounted).
fn revoked() -> ClientError {
    ClientError::Rpc(tonic::Status::permission_denied(
        "this snapshot is no longer readable by this user",
    ))
}

/// Puts chunk `b` in every empty slot of `out` whose id (`ids`, same order) is `id`.
fn fill(out: &mut [Option<bytes::Bytes>], ids: &[ChunkId], id: &ChunkId, b: &bytes::Bytes) {
    for (slot, i) in out.iter_mut().zip(ids) {
        if slot.is_none() && i == id {
            *slot = Some(b.clone());
        }
    }
}

/// The errno for a failed call (logged once here: the kernel only passes the number on).
fn errno(what: &str, e: &ClientError) -> i32 {
    let code = match e {
        ClientError::Rpc(s) => match s.code() {
            tonic::Code::NotFound => libc::ENOENT,
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => libc::EACCES,
            _ => libc::EIO,
        },
        _ => libc::EIO,
    };
    if code == libc::EIO {
        eprintln!("coffer mount: {what}: {e}");
    }
    code
}

impl Inner {
    /// The snapshot list, read again when older than the refresh interval; the views rebuilt
    /// from it.
    async fn snapshots(self: &Arc<Self>) -> Result<(), ClientError> {
        let mut read_at = self.listed_at.lock().await;
        if read_at.is_some_and(|t| t.elapsed() < self.opts.refresh) {
            return Ok(());
        }
        let list = self.session.list("", true).await?;
        let revoked: Vec<SnapshotId> = {
            let mut t = lock(&self.table);
            t.set_snapshots(&list);
            t.revoked_ids().copied().collect()
        };
        // A snapshot no longer listed is opened again (and refused) if it comes back.
        self.opened.lock().await.retain(|id| !revoked.contains(id));
        *read_at = Some(Instant::now());
        Ok(())
    }

    async fn open_snapshot(&self, id: &SnapshotId) -> Result<(), ClientError> {
        if lock(&self.table).revoked(id) {
            return Err(revoked());
        }
        let mut opened = self.opened.lock().await;
        if !opened.contains(id) {
            self.session.open(id).await?;
            opened.insert(*id);
        }
        Ok(())
    }

    /// Makes sure the listing of directory `ino` is complete up to `name` (or, without a name,
    /// holds more than `count` entries or is complete).
    async fn load_listing(
        self: &Arc<Self>,
        ino: u64,
        name: Option<&[u8]>,
        count: usize,
    ) -> Result<(), ClientError> {
        let kind = lock(&self.table).kind(ino);
        match kind {
            Some(Kind::Root | Kind::View | Kind::Group(_)) => return self.snapshots().await,
            Some(Kind::Dir { snap, .. }) => self.open_snapshot(&snap).await?,
            _ => return Ok(()),
        }
        loop {
            let Some(part) = lock(&self.table).wants_part(ino, name, count) else {
                return Ok(());
            };
            let bytes = self.session.get(&[part]).await?;
            let tree = crate::snapshot::tree::decode_checked(&part, &bytes[0])?;
            lock(&self.table).add_part(ino, part, tree)?;
        }
    }

    async fn lookup(
        self: &Arc<Self>,
        parent: u64,
        name: &[u8],
    ) -> Result<Option<u64>, ClientError> {
        self.load_listing(parent, Some(name), 0).await?;
        Ok(lock(&self.table).child(parent, name))
    }

    /// A handle on file `ino`; `None` when it is not a file.
    async fn open(self: &Arc<Self>, ino: u64) -> Result<Option<u64>, ClientError> {
        let Some(Kind::File { snap, node }) = lock(&self.table).kind(ino) else {
            return Ok(None);
        };
        self.open_snapshot(&snap).await?;
        let ids = node_chunk_ids(&self.session, &node).await?;
        let f = OpenFile {
            snap,
            ids,
            starts: vec![0],
            bundle_offset: (!node.bundle.is_empty()).then_some(node.bundle_offset),
            size: node.size,
        };
        let fh = self
            .next_fh
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.files).insert(fh, Arc::new(tokio::sync::Mutex::new(f)));
        Ok(Some(fh))
    }

    /// Chunks `ids`, from the cache or fetched in one call (and cached).
    async fn chunks(&self, ids: &[ChunkId]) -> Result<Vec<bytes::Bytes>, ClientError> {
        let mut out: Vec<Option<bytes::Bytes>> = {
            let mut c = lock(&self.cache);
            ids.iter().map(|id| c.get(id)).collect()
        };
        let mut missing: Vec<ChunkId> = ids
            .iter()
            .zip(&out)
            .filter(|(_, b)| b.is_none())
            .map(|(id, _)| *id)
            .collect();
        if let Some(disk) = &self.disk {
            let mut from_disk = Vec::new();
            for id in &missing {
                if let Some(b) = disk.get(id).await {
                    from_disk.push((*id, b));
                }
            }
            let mut c = lock(&self.cache);
            for (id, b) in from_disk {
                fill(&mut out, ids, &id, &b);
                missing.retain(|m| *m != id);
                c.put(id, b.clone(), b.len() as u64);
            }
        }
        if !missing.is_empty() {
            let got = self.session.get(&missing).await?;
            let fetched: Vec<(ChunkId, bytes::Bytes)> = missing.into_iter().zip(got).collect();
            {
                let mut c = lock(&self.cache);
                for (id, b) in &fetched {
                    fill(&mut out, ids, id, b);
                    c.put(*id, b.clone(), b.len() as u64);
                }
            }
            if let Some(disk) = &self.disk {
                disk.put_later(fetched).await;
            }
        }
        Ok(out.into_iter().map(|b| b.expect("filled")).collect())
    }

    async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, ClientError> {
        let f = lock(&self.files)
            .get(&fh)
            .cloned()
            .ok_or_else(|| ClientError::Protocol("read of a file handle not open".into()))?;
        let mut f = f.lock().await;
        // Refused once the snapshot is revoked; opened again if access came back meanwhile.
        self.open_snapshot(&f.snap).await?;
        let end = offset.saturating_add(u64::from(size)).min(f.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        if let Some(at) = f.bundle_offset {
            let b = self.chunks(&f.ids[..1]).await?.remove(0);
            let (s, e) = (at.saturating_add(offset), at.saturating_add(end));
            return b
                .get(usize::try_from(s).unwrap_or(usize::MAX)..usize::try_from(e).unwrap_or(0))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| {
                    ClientError::Protocol("a file lies outside its bundle: damaged snapshot".into())
                });
        }
        // Learn offsets in order until the range is covered (the chunks read stay cached).
        while *f.starts.last().expect("starts with 0") < end && f.starts.len() <= f.ids.len() {
            let from = f.starts.len() - 1;
            let to = (from + READ_AHEAD).min(f.ids.len());
            let got = self.chunks(&f.ids[from..to]).await?;
            for b in got {
                let next = f.starts.last().expect("non-empty") + b.len() as u64;
                f.starts.push(next);
            }
        }
        if *f.starts.last().expect("non-empty") < end {
            return Err(ClientError::Protocol(format!(
                "a file of {} bytes whose chunks hold {}: damaged snapshot",
                f.size,
                f.starts.last().expect("non-empty")
            )));
        }
        // Both below `ids.len()`: `starts` has one entry per chunk read plus its end, and the
        // range ends inside what was read.
        let first = f.starts.partition_point(|&s| s <= offset) - 1;
        let last = f.starts.partition_point(|&s| s < end) - 1;
        let mut want: Vec<ChunkId> = f.ids[first..=last].to_vec();
        // Sequential readers: the chunks after these come with them.
        let ahead = (last + 1..f.ids.len().min(last + 1 + READ_AHEAD / 2))
            .filter(|i| *i + 1 >= f.starts.len() || !lock(&self.cache).contains(&f.ids[*i]));
        want.extend(ahead.map(|i| f.ids[i]).take(READ_AHEAD / 2));
        let got = self.chunks(&want).await?;
        let mut out = Vec::with_capacity(usize::try_from(end - offset).unwrap_or(0));
        for (k, b) in got.iter().take(last - first + 1).enumerate() {
            let start = f.starts[first + k];
            let lo = usize::try_from(offset.saturating_sub(start)).unwrap_or(usize::MAX);
            let hi = usize::try_from((end - start).min(b.len() as u64)).unwrap_or(0);
            out.extend_from_slice(b.get(lo..hi).unwrap_or_default());
        }
        Ok(out)
    }
}

/// The FUSE side: every request is answered from a task on the client's runtime.
pub struct CofferFs {
    inner: Arc<Inner>,
}

impl CofferFs {
    /// A file system over `session`'s snapshots; requests run on `rt`.
    ///
    /// # Errors
    /// The disk cache's directory cannot be created.
    pub fn new(
        session: Session,
        rt: tokio::runtime::Handle,
        opts: MountOptions,
    ) -> Result<Self, ClientError> {
        let disk = match &opts.disk_cache {
            Some(dir) => Some(Arc::new(DiskCache::create(dir, opts.disk_cache_bytes)?)),
            None => None,
        };
        let (uid, gid) = (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                session,
                rt,
                table: Mutex::new(Table::new(uid, gid)),
                cache: Mutex::new(ChunkCache::new(opts.cache_bytes)),
                disk,
                opts,
                listed_at: tokio::sync::Mutex::new(None),
                opened: tokio::sync::Mutex::new(std::collections::HashSet::new()),
                files: Mutex::new(std::collections::HashMap::new()),
                next_fh: std::sync::atomic::AtomicU64::new(1),
            }),
        })
    }
}

impl Filesystem for CofferFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        // Inside a snapshot, a name already read is answered at once (no task, no call).
        {
            let t = lock(&self.inner.table);
            if let (Some(Kind::Dir { snap, .. }), Some(ino)) =
                (t.kind(parent), t.child(parent, name.as_bytes()))
            {
                if t.revoked(&snap) {
                    reply.error(libc::EACCES);
                    return;
                }
                if let Some(a) = t.attr(ino) {
                    reply.entry(&t.ttl(ino), &a, 0);
                    return;
                }
            }
        }
        let inner = self.inner.clone();
        let name = name.as_bytes().to_vec();
        self.inner.rt.spawn(async move {
            match inner.lookup(parent, &name).await {
                Ok(None) => reply.error(libc::ENOENT),
                Ok(Some(ino)) => {
                    let t = lock(&inner.table);
                    match t.attr(ino) {
                        Some(a) => reply.entry(&t.ttl(ino), &a, 0),
                        None => reply.error(libc::ENOENT),
                    }
                }
                Err(e) => reply.error(errno("lookup", &e)),
            }
        });
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let t = lock(&self.inner.table);
        match t.attr(ino) {
            Some(a) => reply.attr(&t.ttl(ino), &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match lock(&self.inner.table).kind(ino) {
            Some(Kind::Link(t)) => reply.data(&t),
            Some(Kind::Latest(t)) => reply.data(t.as_bytes()),
            _ => reply.error(libc::EINVAL),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(libc::EROFS);
            return;
        }
        let inner = self.inner.clone();
        self.inner.rt.spawn(async move {
            match inner.open(ino).await {
                Ok(Some(fh)) => reply.opened(fh, fuser::consts::FOPEN_KEEP_CACHE),
                Ok(None) => reply.error(libc::EISDIR),
                Err(e) => reply.error(errno("open", &e)),
            }
        });
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let inner = self.inner.clone();
        let offset = u64::try_from(offset).unwrap_or(0);
        self.inner.rt.spawn(async move {
            match inner.read(fh, offset, size).await {
                Ok(b) => reply.data(&b),
                Err(e) => reply.error(errno("read", &e)),
            }
        });
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock: Option<u64>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        lock(&self.inner.files).remove(&fh);
        reply.ok();
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let inner = self.inner.clone();
        let from = usize::try_from(offset).unwrap_or(0);
        self.inner.rt.spawn(async move {
            // Entries 0 and 1 are `.` and `..`; listing entry k is offset k + 2. A reply holds
            // a few hundred entries: load a little more than that.
            if let Err(e) = inner.load_listing(ino, None, from + 512).await {
                reply.error(errno("readdir", &e));
                return;
            }
            let t = lock(&inner.table);
            let Some((parent, entries)) = t.entries(ino, from.saturating_sub(2)) else {
                reply.error(libc::ENOTDIR);
                return;
            };
            let dots = [
                (ino, FileType::Directory, b".".to_vec()),
                (parent, FileType::Directory, b"..".to_vec()),
            ];
            let mut k = from;
            for (i, kind, name) in dots.into_iter().skip(from).chain(entries) {
                k += 1;
                if reply.add(
                    i,
                    i64::try_from(k).unwrap_or(i64::MAX),
                    kind,
                    OsStr::from_bytes(&name),
                ) {
                    break;
                }
            }
            drop(t);
            reply.ok();
        });
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }
}

/// Mounts the file system at `mountpoint` and serves it until SIGINT or SIGTERM (then unmounts)
/// or until it is unmounted from outside (`coffer umount`, `fusermount3 -u`).
///
/// # Errors
/// FUSE unavailable, a mount point that is not an empty directory, the mount refused.
pub async fn mount(
    session: Session,
    mountpoint: &Path,
    opts: MountOptions,
) -> Result<(), ClientError> {
    check_fuse()?;
    let md =
        std::fs::metadata(mountpoint).map_err(|e| ClientError::io("mount on", mountpoint, e))?;
    if !md.is_dir() {
        return Err(ClientError::Mount(format!(
            "{}: not a directory",
            mountpoint.display()
        )));
    }
    let fs = CofferFs::new(session, tokio::runtime::Handle::current(), opts)?;
    // Removed however the mount ends (its files cannot be read without this process anyway).
    let _disk = fs.inner.disk.clone().map(RemoveOnDrop);
    if let Some(d) = &fs.inner.disk {
        eprintln!("disk cache in {} (removed at unmount)", d.dir().display());
    }
    // The snapshot list is read every refresh interval even when nobody looks at the views:
    // a revoked snapshot stops reading within it (a shell inside a snapshot never looks), and
    // the session, which the appliance ends after 30 idle minutes, stays alive.
    let refresher = {
        let inner = fs.inner.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(inner.opts.refresh.max(Duration::from_secs(1)));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Err(e) = inner.snapshots().await {
                    eprintln!("coffer mount: reading the snapshot list: {e}");
                }
            }
        })
    };
    let _stop_refresher = AbortOnDrop(refresher);
    let options = [
        MountOption::RO,
        MountOption::FSName("coffer".into()),
        MountOption::Subtype("coffer".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    // Before the mount: a signal in between must unmount, not kill the process.
    let sig = |k| {
        tokio::signal::unix::signal(k)
            .map_err(|e| ClientError::io("handle signals for", mountpoint, e))
    };
    let mut term = sig(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = sig(tokio::signal::unix::SignalKind::hangup())?;
    let mut int = sig(tokio::signal::unix::SignalKind::interrupt())?;
    let at = std::fs::canonicalize(mountpoint)
        .map_err(|e| ClientError::io("mount on", mountpoint, e))?;
    let before = coffer_mounts(&at);
    let mut se = fuser::Session::new(fs, &at, &options)
        .map_err(|e| ClientError::io("mount FUSE on", mountpoint, e))?;
    // This mount's id: only it is ever checked or detached below, never a file system that was
    // mounted at the same place before.
    let ours: Vec<u64> = coffer_mounts(&at)
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    let mut unmount = se.unmount_callable();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || {
            let r = se.run();
            let _ = done_tx.send(r);
        })
        .map_err(|e| ClientError::io("start the FUSE thread for", mountpoint, e))?;
    eprintln!(
        "mounted on {} (read-only); Ctrl-C or `coffer umount {}` unmounts",
        mountpoint.display(),
        mountpoint.display()
    );
    tokio::select! {
        r = done_rx => {
            // Unmounted from outside.
            return r
                .unwrap_or(Ok(()))
                .map_err(|e| ClientError::io("serve FUSE on", mountpoint, e));
        }
        _ = int.recv() => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
    let _ = unmount.unmount();
    let still = || coffer_mounts(&at).iter().any(|id| ours.contains(id));
    if still() {
        // Busy (a shell inside it): detached now, gone once the last user leaves. (As another
        // user, fuser's own unmount already ran `fusermount -u -z`.)
        if rustix::process::geteuid().is_root() {
            let _ = rustix::mount::unmount(&at, rustix::mount::UnmountFlags::DETACH);
        }
        if still() {
            return Err(ClientError::Mount(format!(
                "{} is still mounted (busy?): unmount it with `fusermount3 -u -z {}`",
                at.display(),
                at.display()
            )));
        }
    }
    eprintln!("unmounted {}", mountpoint.display());
    Ok(())
}

/// The ids of the coffer FUSE mounts at `at` (canonical) now, from `/proc/self/mountinfo`.
fn coffer_mounts(at: &Path) -> Vec<u64> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| mounts_at(&m, at))
        .unwrap_or_default()
}

/// The ids of the coffer mounts at `at` in a mountinfo text: file system type `fuse` (mounted by
/// root) or `fuse.coffer` (by `fusermount3`), source `coffer` (proc(5): fields separated by
/// spaces; in paths, space, tab, newline and backslash written as `\ooo`).
fn mounts_at(mountinfo: &str, at: &Path) -> Vec<u64> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let point = unescape_octal(f.get(4)?);
            let fstype = *f.get(sep + 1)?;
            let ours = (fstype == "fuse" || fstype.starts_with("fuse."))
                && f.get(sep + 2) == Some(&"coffer");
            (ours && Path::new(OsStr::from_bytes(&point)) == at)
                .then(|| f[0].parse().ok())
                .flatten()
        })
        .collect()
}

/// `\ooo` escapes undone (as the kernel writes them in `/proc/self/mountinfo`).
fn unescape_octal(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escape = bytes.get(at + 1..at + 4).filter(|digits| {
            bytes[at] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        });
        if let Some(digits) = escape {
            let v = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            at += 4;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    out
}

/// Removes a disk cache's files when dropped.
struct RemoveOnDrop(Arc<DiskCache>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.0.remove();
    }
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `coffer umount`: asks FUSE to unmount `mountpoint` (the mounting `coffer` then exits).
///
/// # Errors
/// fusermount3's refusal (not mounted, busy) or absence.
pub fn umount(mountpoint: &Path) -> Result<(), ClientError> {
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .output()
        .map_err(|e| ClientError::io("run fusermount3 -u for", mountpoint, e))?;
    if !out.status.success() {
        return Err(ClientError::Mount(format!(
            "unmounting {}: {}",
            mountpoint.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_coffer_mounts_at_the_mount_point_are_ours() {
        let info = "\
22 1 0:21 / / rw - ext4 /dev/vda rw
40 22 0:35 / /mnt/a\\040b rw,relatime - ext4 /dev/vdb rw
41 40 0:36 / /mnt/a\\040b ro,nosuid,nodev - fuse.coffer coffer ro,user_id=0
42 22 0:37 / /mnt/other ro - fuse.coffer coffer ro
43 41 0:38 / /mnt/a\\040b ro - fuse coffer ro
44 43 0:39 / /mnt/a\\040b ro - fuse sshfs ro
";
        assert_eq!(mounts_at(info, Path::new("/mnt/a b")), vec![41, 43]);
        assert_eq!(
            mounts_at(info, Path::new("/mnt/a\\040b")),
            Vec::<u64>::new()
        );
        assert_eq!(mounts_at(info, Path::new("/mnt/none")), Vec::<u64>::new());
        assert_eq!(unescape_octal("x\\134y\\9"), b"x\\y\\9");
    }
}
