//! The local pack store: one O_DIRECT file per pack under `<repo>/packs/<xx>/<id>`, written and
//! read through glommio (io_uring).
//!
//! O_DIRECT needs 4 KiB-aligned writes, so the partial last block of a pack (`tail`) is kept in
//! memory and rewritten at the start of the next append; the padding after the logical end is
//! overwritten by the next append or cut by `truncate` on the last one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use coffer_proto::PackId;
use glommio::io::{DmaFile, ReadResult};

use super::s3::{AckAfter, Tier};
use super::{PackSink, PackStore, StoreError};
use crate::repo::RepoPaths;

const ALIGN: u64 = 4096;
/// Pack files a store keeps open for reading.
const MAX_OPEN_READERS: usize = 256;

fn align_down(v: u64) -> u64 {
    v & !(ALIGN - 1)
}

fn align_up(v: u64) -> u64 {
    (v + ALIGN - 1) & !(ALIGN - 1)
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).expect("pack offsets fit in memory-sized buffers")
}

/// Packs as local files.
#[derive(Debug)]
pub struct LocalStore {
    paths: RepoPaths,
    /// Free bytes kept for the index and catalog; `None`: [`reserve`] of
    /// the file system's size.
    reserve: Option<u64>,
    readers: RefCell<HashMap<PackId, Rc<DmaFile>>>,
    /// The tier's eviction count when `readers` was last cleared (see [`Tier::evictions`]).
    seen_evictions: std::cell::Cell<u64>,
    /// The object store behind this one, if any: sealed packs are uploaded there and packs no
    /// longer on the local disk are read from it (see [`super::s3`]).
    tier: Option<Arc<Tier>>,
}

/// Bytes read back from the local disk or the object store.
#[derive(Debug)]
pub enum PackBytes {
    Local(ReadResult),
    Remote(bytes::Bytes),
}

impl std::ops::Deref for PackBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Local(r) => r,
            Self::Remote(b) => b,
        }
    }
}

impl LocalStore {
    #[must_use]
    pub fn new(paths: RepoPaths, reserve: Option<u64>) -> Self {
        Self {
            paths,
            reserve,
            readers: RefCell::new(HashMap::new()),
            seen_evictions: std::cell::Cell::new(0),
            tier: None,
        }
    }

    /// The same store in front of an object store: it becomes the staging area and cache.
    #[must_use]
    pub fn with_tier(mut self, tier: Option<Arc<Tier>>) -> Self {
        self.tier = tier;
        self
    }

    async fn reader(&self, id: &PackId) -> Result<Rc<DmaFile>, StoreError> {
        if let Some(t) = &self.tier {
            // Evicted files are freed only once nothing holds them open.
            let now = t.evictions();
            if now != self.seen_evictions.get() {
                self.readers.borrow_mut().clear();
                self.seen_evictions.set(now);
            }
        }
        if let Some(f) = self.readers.borrow().get(id) {
            return Ok(f.clone());
        }
        let f = Rc::new(
            DmaFile::open(&self.paths.pack(id))
                .await
                .map_err(|e| StoreError::new("opening", e))?,
        );
        let mut r = self.readers.borrow_mut();
        if r.len() >= MAX_OPEN_READERS {
            r.clear();
        }
        r.insert(*id, f.clone());
        Ok(f)
    }
}

/// A local pack being written.
#[derive(Debug)]
pub struct LocalSink {
    file: DmaFile,
    /// Logical length: bytes of header and records (what a reader may rely on).
    len: u64,
    header_len: u64,
    /// Bytes from `align_down(len)` to `len`, rewritten at the start of the next append.
    tail: Vec<u8>,
    /// The object store the sealed pack is staged for, and the pack's id.
    tier: Option<(Arc<Tier>, PackId)>,
}

impl PackStore for LocalStore {
    type Sink = LocalSink;
    type Read = PackBytes;

    async fn create(&self, id: &PackId, header: &[u8]) -> Result<LocalSink, StoreError> {
        let path = self.paths.pack(id);
        let dir = path.parent().expect("pack paths have a parent");
        // `packs/<xx>/` itself must be durable too, not only the pack's name in it.
        crate::repo::create_dir_durable(dir)
            .map_err(|e| StoreError::new("creating its directory", e))?;
        if let Some(t) = &self.tier {
            t.opened(*id);
        }
        let file = DmaFile::create(&path)
            .await
            .map_err(|e| StoreError::new("creating", e))?;
        // The directory entry must be durable before anything in the file is acknowledged.
        crate::repo::sync_dir(dir).map_err(|e| StoreError::new("syncing its directory", e))?;
        Ok(LocalSink {
            file,
            len: header.len() as u64,
            header_len: header.len() as u64,
            tail: header.to_vec(),
            tier: self.tier.clone().map(|t| (t, *id)),
        })
    }

    async fn read_at(&self, id: &PackId, offset: u64, len: usize) -> Result<PackBytes, StoreError> {
        let local = match self.reader(id).await {
            Ok(f) => f,
            Err(e) => match &self.tier {
                // Uploaded and dropped from the local cache: a ranged GET.
                Some(t) if e.source.kind() == std::io::ErrorKind::NotFound => {
                    return t
                        .read(id, offset, len)
                        .await
                        .map(PackBytes::Remote)
                        .map_err(|e| {
                            StoreError::new(
                                "reading from the object store",
                                std::io::Error::other(e),
                            )
                        });
                }
                _ => return Err(e),
            },
        };
        if let Some(t) = &self.tier {
            t.touch(id);
        }
        local
            .read_at(offset, len)
            .await
            .map(PackBytes::Local)
            .map_err(|e| StoreError::new("reading", e))
    }

    fn seals_every_commit(&self) -> bool {
        self.tier
            .as_ref()
            .is_some_and(|t| t.ack_after() == AckAfter::Remote)
    }

    fn discard(&self, id: &PackId) -> Result<(), StoreError> {
        self.readers.borrow_mut().remove(id);
        if let Some(t) = &self.tier {
            t.discarded(id);
        }
        std::fs::remove_file(self.paths.pack(id)).map_err(|e| StoreError::new("removing", e))
    }

    fn delete(&self, id: &PackId) -> Result<(), StoreError> {
        // Dropping the cached reader closes the file, so that its space is freed now.
        self.readers.borrow_mut().remove(id);
        if let Some(t) = &self.tier {
            t.forget(id);
        }
        let path = self.paths.pack(id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::new("deleting", e)),
        }
        crate::faults::point("store.unlinked");
        let dir = path.parent().expect("pack paths have a parent");
        crate::repo::sync_dir(dir)
            .map_err(|e| StoreError::new("syncing its directory after deleting", e))
    }

    fn check_space(&self, need: u64) -> Result<(), StoreError> {
        check_free_space(&self.paths.packs(), need + ALIGN * 2, self.reserve)
            .map_err(|e| StoreError::new("checking free space", e))?;
        match &self.tier {
            Some(t) => t
                .check(need)
                .map_err(|e| StoreError::new("checking the staging area", e)),
            None => Ok(()),
        }
    }
}

impl PackSink for LocalSink {
    fn len(&self) -> u64 {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == self.header_len
    }

    async fn append(
        &mut self,
        len: usize,
        last: bool,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), StoreError> {
        let end = self.len + len as u64;
        let base = align_down(self.len);
        let mut buf = self.file.alloc_dma_buffer(usize_of(align_up(end) - base));
        let bytes = buf.as_bytes_mut();
        bytes[..self.tail.len()].copy_from_slice(&self.tail);
        let start = usize_of(self.len - base);
        fill(&mut bytes[start..start + len]);
        bytes[start + len..].fill(0);
        let tail = bytes[usize_of(align_down(end) - base)..usize_of(end - base)].to_vec();
        let want = bytes.len();
        let wrote = self
            .file
            .write_at(buf, base)
            .await
            .map_err(|e| StoreError::new("writing", e))?;
        if wrote != want {
            // A short write to a regular file means the file system ran out of space (or a
            // size limit was hit): reported as a full disk.
            return Err(StoreError::new(
                "writing",
                std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!("short write {wrote}/{want} (no space left on the device?)"),
                ),
            ));
        }
        if last {
            self.file
                .truncate(end)
                .await
                .map_err(|e| StoreError::new("truncating", e))?;
        }
        self.file
            .fdatasync()
            .await
            .map_err(|e| StoreError::new("fdatasync", e))?;
        self.len = end;
        self.tail = tail;
        if last {
            if let Some((t, id)) = &self.tier {
                crate::faults::point("s3.staged");
                if let Some(rx) = t.sealed(*id, end) {
                    // `--ack-after remote`: nothing in the pack is acknowledged before the
                    // object store confirmed it.
                    let outcome = rx
                        .recv_async()
                        .await
                        .unwrap_or_else(|_| Err("the object-store uploader stopped".to_string()));
                    outcome.map_err(|e| {
                        StoreError::new("uploading to the object store", std::io::Error::other(e))
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// Fails (`StorageFull`) when writing `need` bytes under `dir` would leave less than the reserve
/// (`reserve`, or [`reserve`] of the file system's size) free. An unreadable file system passes:
/// the write itself then reports a full disk.
///
/// # Errors
/// `StorageFull` naming free, needed and kept bytes.
pub fn check_free_space(
    dir: &std::path::Path,
    need: u64,
    reserve_bytes: Option<u64>,
) -> std::io::Result<()> {
    let Ok(st) = rustix::fs::statvfs(dir) else {
        return Ok(());
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let keep = reserve_bytes.unwrap_or_else(|| reserve(st.f_blocks.saturating_mul(st.f_frsize)));
    if free < need.saturating_add(keep) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!(
                "No space left: {free} bytes free, {need} needed plus {keep} kept for the index \
                 and catalog"
            ),
        ));
    }
    Ok(())
}

/// Free space the pack writer leaves on a file system of `total` bytes for RocksDB (index and
/// catalog): 2 %, at least 8 MiB, at most 1 GiB.
#[must_use]
pub fn reserve(total: u64) -> u64 {
    (total / 50).clamp(8 << 20, 1 << 30)
}
