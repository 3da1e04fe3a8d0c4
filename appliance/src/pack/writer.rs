//! The shard's pack writer: glommio DMA (O_DIRECT, io_uring) appends with group commit.
//!
//! Each call to [`PackWriter::write`] is one group commit: all chunks queued since the previous
//! call are encrypted straight into one aligned buffer, written with a single io_uring write and
//! made durable with one `fdatasync`. O_DIRECT needs 4 KiB-aligned writes, so the partial last
//! block of the pack (`tail`) is kept in memory and rewritten at the start of the next buffer;
//! the padding after the logical end is overwritten by the next write or cut by `truncate` on
//! seal.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use coffer_proto::{ChunkId, PackId};
use glommio::io::DmaFile;

use super::format::{
    encode_footer, footer_len, record_nonce, FooterEntry, IndexEntry, PackHeader, RecordHeader,
    PACK_HEADER_LEN, RECORD_AAD_LEN, RECORD_HEADER_LEN,
};
use crate::crypto::keys::{MasterKey, PackKey, TAG_LEN};
use crate::index::{ChunkIndex, META_OPEN_PACK, META_POISONED};
use crate::repo::RepoPaths;

const ALIGN: u64 = 4096;

/// A verified chunk waiting to be written.
#[derive(Debug, Clone)]
pub struct PendingChunk {
    pub id: ChunkId,
    pub raw_len: u32,
    pub flags: u8,
    /// What is stored (plaintext or its zstd frame); encrypted on the way into the pack.
    pub data: Bytes,
}

impl PendingChunk {
    /// Bytes this chunk's record takes in the pack.
    #[must_use]
    pub fn record_len(&self) -> u64 {
        (RECORD_HEADER_LEN + self.data.len() + TAG_LEN) as u64
    }
}

/// A write or fsync failed; the pack it was for is poisoned.
#[derive(Debug, thiserror::Error)]
#[error("pack {pack}: {what}: {source}")]
pub struct PackError {
    pub pack: String,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl PackError {
    /// Whether the failure was a full disk (or quota).
    #[must_use]
    pub fn is_no_space(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(libc::ENOSPC | libc::EDQUOT)
        ) || self.source.kind() == std::io::ErrorKind::StorageFull
            || self.source.to_string().contains("No space left")
    }
}

struct OpenPack {
    id: PackId,
    file: DmaFile,
    key: PackKey,
    /// Logical length: bytes of header and records (what a reader may rely on).
    len: u64,
    /// Bytes from `align_down(len)` to `len`, to be rewritten at the start of the next write.
    tail: Vec<u8>,
    seq: u64,
    entries: Vec<FooterEntry>,
}

/// Writes one shard's packs. Owned by the shard's pack task; never shared.
pub struct PackWriter {
    paths: RepoPaths,
    master: Arc<MasterKey>,
    index: Arc<dyn ChunkIndex>,
    shard: u16,
    repo_id: [u8; 16],
    target: u64,
    open: Option<OpenPack>,
    /// Free space left for RocksDB; `None`: [`reserve`] of the file system's size.
    space_reserve: Option<u64>,
    /// Packs sealed by this writer (for stats and tests).
    pub sealed: u64,
}

impl std::fmt::Debug for PackWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackWriter(shard {})", self.shard)
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

fn align_down(v: u64) -> u64 {
    v & !(ALIGN - 1)
}

fn align_up(v: u64) -> u64 {
    (v + ALIGN - 1) & !(ALIGN - 1)
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).expect("pack offsets fit in memory-sized buffers")
}

impl PackWriter {
    #[must_use]
    pub fn new(
        paths: RepoPaths,
        master: Arc<MasterKey>,
        index: Arc<dyn ChunkIndex>,
        shard: u16,
        repo_id: [u8; 16],
        target: u64,
    ) -> Self {
        Self {
            paths,
            master,
            index,
            shard,
            repo_id,
            target,
            open: None,
            space_reserve: None,
            sealed: 0,
        }
    }

    /// Sets the free space kept for the index and catalog (`serve --space-reserve`); `None`
    /// keeps [`reserve`] of the file system's size.
    #[must_use]
    pub fn with_space_reserve(mut self, bytes: Option<u64>) -> Self {
        self.space_reserve = bytes;
        self
    }

    async fn create(&self) -> Result<OpenPack, PackError> {
        let id = PackId::from_bytes(rand::random());
        let path: PathBuf = self.paths.pack(&id);
        let err = |what, source| PackError {
            pack: id.to_hex(),
            what,
            source,
        };
        let dir = path
            .parent()
            .expect("pack paths have a parent")
            .to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| err("creating its directory", e))?;
        let file = DmaFile::create(&path)
            .await
            .map_err(|e| err("creating", e.into()))?;
        // The directory entry must be durable before anything in the file is acknowledged.
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err("syncing its directory", e))?;
        // Recovery after a crash starts from this marker (see `recover`).
        self.index
            .put_meta(META_OPEN_PACK, Some(id.as_bytes()))
            .map_err(|e| {
                err(
                    "recording the open pack",
                    std::io::Error::other(e.to_string()),
                )
            })?;
        let header = PackHeader {
            pack: id,
            shard: self.shard,
            repo_id: self.repo_id,
            created_us: coffer_proto::now_us(),
        };
        Ok(OpenPack {
            id,
            file,
            key: self.master.pack_key(&id),
            len: PACK_HEADER_LEN as u64,
            tail: header.encode().to_vec(),
            seq: 0,
            entries: Vec::new(),
        })
    }

    /// Writes `chunks` durably and indexes them. Returns only after `fdatasync` succeeded for
    /// every byte and the index batch was applied. On error nothing of this call may be
    /// acknowledged, and the open pack is abandoned (poisoned).
    ///
    /// # Errors
    /// [`PackError`] from create, write, truncate, fsync or the index.
    pub async fn write(&mut self, chunks: &[PendingChunk]) -> Result<(), PackError> {
        self.check_space(chunks)?;
        let mut i = 0;
        while i < chunks.len() {
            if self.open.is_none() {
                self.open = Some(self.create().await?);
            }
            let res = self.write_some(&chunks[i..], false).await;
            match res {
                Ok(n) => i += n,
                Err(e) => {
                    // Poison: the pack is never appended to again. Its earlier group commits
                    // are durable and indexed, so it is kept and listed for sealing at the next
                    // start (`recover_open_pack`); a new pack is created for the next write.
                    if let Some(p) = self.open.take() {
                        self.record_poisoned(p.id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Writes as many of `chunks` as fit into the open pack (at least one, unless there are
    /// none); seals it when full, when chunks remain, or when `force_seal`.
    async fn write_some(
        &mut self,
        chunks: &[PendingChunk],
        force_seal: bool,
    ) -> Result<usize, PackError> {
        let target = self.target;
        let p = self.open.as_mut().expect("caller opened a pack");
        let mut end = p.len;
        let mut n = 0;
        for c in chunks {
            if n > 0 && end + c.record_len() > target {
                break;
            }
            end += c.record_len();
            n += 1;
        }
        let seal = force_seal || n < chunks.len() || end >= target;
        let file_end = if seal {
            end + footer_len(p.entries.len() + n) as u64
        } else {
            end
        };
        let base = align_down(p.len);
        let mut buf = p.file.alloc_dma_buffer(usize_of(align_up(file_end) - base));
        let bytes = buf.as_bytes_mut();
        bytes[..p.tail.len()].copy_from_slice(&p.tail);
        let mut pos = usize_of(p.len - base);
        let mut index_batch = Vec::with_capacity(n);
        for c in &chunks[..n] {
            let nonce = record_nonce(p.seq);
            p.seq += 1;
            let stored_len = u32::try_from(c.data.len() + TAG_LEN).expect("chunks are < 4 GiB");
            let h = RecordHeader {
                flags: c.flags,
                id: c.id,
                raw_len: c.raw_len,
                stored_len,
                nonce,
            }
            .encode();
            let rec_len = RECORD_HEADER_LEN + c.data.len() + TAG_LEN;
            let rec = &mut bytes[pos..pos + rec_len];
            rec[..RECORD_HEADER_LEN].copy_from_slice(&h);
            let (_, body) = rec.split_at_mut(RECORD_HEADER_LEN);
            let (payload, tag_out) = body.split_at_mut(c.data.len());
            payload.copy_from_slice(&c.data);
            let tag = p.key.seal(nonce, &h[..RECORD_AAD_LEN], payload);
            tag_out.copy_from_slice(&tag);
            let offset = base + pos as u64;
            let len = u32::try_from(rec_len).expect("records are < 4 GiB");
            p.entries.push(FooterEntry {
                id: c.id,
                offset,
                len,
                raw_len: c.raw_len,
            });
            index_batch.push((
                c.id,
                IndexEntry {
                    flags: c.flags,
                    pack: p.id,
                    offset,
                    len,
                    raw_len: c.raw_len,
                },
            ));
            pos += rec_len;
        }
        if seal {
            let footer = encode_footer(&p.entries, end);
            bytes[pos..pos + footer.len()].copy_from_slice(&footer);
            pos += footer.len();
        }
        bytes[pos..].fill(0);
        let new_tail_start = usize_of(align_down(file_end) - base);
        let new_tail = bytes[new_tail_start..usize_of(file_end - base)].to_vec();
        let want = bytes.len();
        let pack = p.id.to_hex();
        let err = |what, source| PackError {
            pack: pack.clone(),
            what,
            source,
        };
        let wrote = p
            .file
            .write_at(buf, base)
            .await
            .map_err(|e| err("writing", e.into()))?;
        if wrote != want {
            // A short write to a regular file means the file system ran out of space (or a
            // size limit was hit): reported as a full disk.
            return Err(err(
                "writing",
                std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!("short write {wrote}/{want} (no space left on the device?)"),
                ),
            ));
        }
        if seal {
            p.file
                .truncate(file_end)
                .await
                .map_err(|e| err("truncating", e.into()))?;
        }
        p.file
            .fdatasync()
            .await
            .map_err(|e| err("fdatasync", e.into()))?;
        p.len = file_end;
        p.tail = new_tail;
        // Durable: now, and only now, the index may point at these bytes. A sealed pack's
        // entries are synced so that the open-pack marker can move on.
        let to_io =
            |e: crate::error::RepoError| err("indexing", std::io::Error::other(e.to_string()));
        self.index.insert_batch(&index_batch, seal).map_err(to_io)?;
        if seal {
            self.index.put_meta(META_OPEN_PACK, None).map_err(to_io)?;
            self.open = None;
            self.sealed += 1;
        }
        Ok(n)
    }

    /// Refuses a group commit that would leave less than [`reserve`] free on the packs' file
    /// system: the index and the catalog (RocksDB) keep room to write, so a full disk ends in
    /// a clear `RESOURCE_EXHAUSTED` instead of torn packs and a database in error. Nothing is
    /// written and the open pack stays usable; service resumes when space returns.
    fn check_space(&self, chunks: &[PendingChunk]) -> Result<(), PackError> {
        let need: u64 = chunks.iter().map(PendingChunk::record_len).sum::<u64>() + ALIGN * 2;
        check_free_space(&self.paths.packs(), need, self.space_reserve).map_err(|source| {
            PackError {
                pack: self
                    .open
                    .as_ref()
                    .map_or_else(|| "(none open)".to_string(), |p| p.id.to_hex()),
                what: "checking free space",
                source,
            }
        })
    }

    /// Adds `id` to the packs the next start seals (best effort: when even this fails, the
    /// open-pack marker still names the pack unless a later pack replaced it, and
    /// `rebuild-index` seals every unsealed pack).
    fn record_poisoned(&self, id: PackId) {
        let mut list = match self.index.get_meta(META_POISONED) {
            Ok(v) => v.unwrap_or_default(),
            Err(e) => {
                tracing::error!(pack = %id, error = %e, "cannot read the poisoned-pack list");
                return;
            }
        };
        list.extend_from_slice(id.as_bytes());
        if let Err(e) = self.index.put_meta(META_POISONED, Some(&list)) {
            tracing::error!(pack = %id, error = %e, "cannot record the poisoned pack");
        }
    }

    /// Seals the open pack, if any (graceful shutdown).
    ///
    /// # Errors
    /// As [`PackWriter::write`].
    pub async fn seal(&mut self) -> Result<(), PackError> {
        let Some(p) = self.open.as_ref() else {
            return Ok(());
        };
        if p.entries.is_empty() {
            // Nothing in it: remove the empty file instead of sealing it.
            let path = self.paths.pack(&p.id);
            self.open = None;
            let _ = std::fs::remove_file(path);
            let _ = self.index.put_meta(META_OPEN_PACK, None);
            return Ok(());
        }
        let res = self.write_some(&[], true).await;
        if res.is_err() {
            self.open = None;
        }
        res.map(|_| ())
    }
}
