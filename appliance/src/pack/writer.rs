//! The shard's pack writer: group commits of encrypted records into the open pack.
//!
//! Each call to [`PackWriter::write`] is one group commit: all chunks queued since the previous
//! call are encrypted (through the [`Encryption`] seam) straight into the store's buffer and
//! appended with one durable [`PackSink::append`] (one io_uring write and one `fdatasync` in the
//! local store). Only then are their index entries inserted.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use coffer_proto::{ChunkId, PackId, RepositoryId, ShardId};

use super::format::{
    encode_footer, footer_len, record_nonce, FooterEntry, IndexEntry, PackHeader, RecordHeader,
    FLAG_SEALED, PACK_HEADER_LEN, RECORD_AAD_LEN, RECORD_HEADER_LEN,
};
use super::store::{LocalStore, PackSink, PackStore, StoreError};
use crate::crypto::{Encryption, RecordCipher, TAG_LEN};
use crate::index::{ChunkIndex, META_OPEN_PACK, META_POISONED};

pub use super::store::local::{check_free_space, reserve};

/// A verified chunk waiting to be written.
#[derive(Debug, Clone)]
pub struct PendingChunk {
    pub id: ChunkId,
    pub raw_len: u32,
    pub flags: u8,
    /// What is stored (plaintext or its zstd frame); encrypted on the way into the pack.
    pub data: Bytes,
    /// Sealed records: the ownership key of the uploading account (see
    /// [`super::format::IndexEntry::uploader`]).
    pub owner: Option<[u8; 16]>,
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
    fn of(pack: &PackId, e: StoreError) -> Self {
        Self {
            pack: pack.to_hex(),
            what: e.what,
            source: e.source,
        }
    }

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

struct OpenPack<K> {
    id: PackId,
    sink: K,
    cipher: Box<dyn RecordCipher>,
    seq: u64,
    entries: Vec<FooterEntry>,
}

/// Writes one shard's packs into its store. Owned by the shard's pack task; never shared.
pub struct PackWriter<S: PackStore = LocalStore> {
    store: Rc<S>,
    encryption: Arc<dyn Encryption>,
    index: Arc<dyn ChunkIndex>,
    shard: ShardId,
    repo_id: RepositoryId,
    target: u64,
    open: Option<OpenPack<S::Sink>>,
    /// Every pack this writer created or appended to since the GC last cleared the set (at the
    /// start of its run, once the open pack is sealed): the shard never lets the GC delete one
    /// of them in that run (G8), since its live records may postdate the run's count.
    written: Rc<RefCell<HashSet<PackId>>>,
    /// Poisoned packs not yet in the index's poisoned list (recording failed: the index itself
    /// was failing). No new pack is opened until they are recorded: the open-pack marker keeps
    /// naming the last one meanwhile, so the next start seals it either way.
    unrecorded_poison: Vec<PackId>,
    /// Packs sealed by this writer (for stats and tests).
    pub sealed: u64,
    /// Where group commit latency and sealed packs are counted (`serve` sets it).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl<S: PackStore> std::fmt::Debug for PackWriter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackWriter(shard {})", self.shard)
    }
}

impl<S: PackStore> PackWriter<S> {
    #[must_use]
    pub fn new(
        store: Rc<S>,
        encryption: Arc<dyn Encryption>,
        index: Arc<dyn ChunkIndex>,
        shard: ShardId,
        repo_id: RepositoryId,
        target: u64,
    ) -> Self {
        Self {
            store,
            encryption,
            index,
            shard,
            repo_id,
            target,
            open: None,
            written: Rc::new(RefCell::new(HashSet::new())),
            unrecorded_poison: Vec::new(),
            sealed: 0,
            metrics: None,
        }
    }

    /// The packs written since the GC last cleared the set, shared with the shard (see
    /// `written`).
    #[must_use]
    pub fn written(&self) -> Rc<RefCell<HashSet<PackId>>> {
        self.written.clone()
    }

    async fn create(&mut self) -> Result<OpenPack<S::Sink>, PackError> {
        if let Some(last) = self.unrecorded_poison.last().copied() {
            self.record_poisoned().map_err(|e| PackError {
                pack: last.to_hex(),
                what: "recording a poisoned pack",
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        let id = PackId::from_bytes(rand::random());
        // Before the file exists: from its creation on, the GC may not delete it this run.
        self.written.borrow_mut().insert(id);
        let header = PackHeader {
            pack: id,
            shard: self.shard,
            repo_id: self.repo_id,
            created_us: coffer_proto::now_us(),
        };
        let sink = self
            .store
            .create(&id, &header.encode())
            .await
            .map_err(|e| PackError::of(&id, e))?;
        // Recovery after a crash starts from this marker (see `recover`).
        self.index
            .put_meta(META_OPEN_PACK, Some(id.as_bytes()))
            .map_err(|e| PackError {
                pack: id.to_hex(),
                what: "recording the open pack",
                source: std::io::Error::other(e.to_string()),
            })?;
        debug_assert_eq!(sink.len(), PACK_HEADER_LEN as u64);
        Ok(OpenPack {
            id,
            sink,
            cipher: self.encryption.pack_cipher(&id),
            seq: 0,
            entries: Vec::new(),
        })
    }

    /// Writes `chunks` durably and indexes them. Returns only after every byte is durable and
    /// the index batch was applied. On error nothing of this call may be acknowledged, and the
    /// open pack is abandoned (poisoned).
    ///
    /// # Errors
    /// [`PackError`] from create, write, truncate, fsync or the index.
    pub async fn write(&mut self, chunks: &[PendingChunk]) -> Result<(), PackError> {
        self.check_space(chunks)?;
        let seal_each = self.store.seals_every_commit();
        let mut i = 0;
        while i < chunks.len() {
            if self.open.is_none() {
                match self.create().await {
                    Ok(p) => self.open = Some(p),
                    Err(e) => return Err(e),
                }
            }
            let res = self.write_some(&chunks[i..], seal_each).await;
            match res {
                Ok(n) => i += n,
                Err(e) => {
                    // Poison: the pack is never appended to again. Its earlier group commits
                    // are durable and indexed, so it is kept and listed for sealing at the next
                    // start (`recover_open_pack`); a new pack is created for the next write.
                    self.poison_open();
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
        let start = p.sink.len();
        let mut end = start;
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
        let len = usize::try_from(file_end - start).expect("a group commit fits in memory");
        let mut index_batch = Vec::with_capacity(n);
        let (id, cipher, seq, entries) = (p.id, &p.cipher, &mut p.seq, &mut p.entries);
        let fill = |bytes: &mut [u8]| {
            let mut pos = 0;
            for c in &chunks[..n] {
                let offset = start + pos as u64;
                let rec_len = seal_record(cipher.as_ref(), seq, c, &mut bytes[pos..]);
                let len = u32::try_from(rec_len).expect("records are < 4 GiB");
                entries.push(FooterEntry {
                    id: c.id,
                    offset,
                    len,
                    raw_len: c.raw_len,
                });
                index_batch.push((
                    c.id,
                    IndexEntry {
                        flags: c.flags,
                        pack: id,
                        offset,
                        len,
                        raw_len: c.raw_len,
                        digest: (c.flags & FLAG_SEALED != 0)
                            .then(|| super::format::envelope_digest(&c.data)),
                        uploader: c.owner.filter(|_| c.flags & FLAG_SEALED != 0),
                    },
                ));
                pos += rec_len;
            }
            if seal {
                let footer = encode_footer(entries, end);
                bytes[pos..pos + footer.len()].copy_from_slice(&footer);
            }
        };
        let began = std::time::Instant::now();
        p.sink
            .append(len, seal, fill)
            .await
            .map_err(|e| PackError::of(&id, e))?;
        if let Some(m) = &self.metrics {
            m.pack_fsync_seconds.observe(began.elapsed().as_secs_f64());
            if seal {
                m.packs_sealed.inc();
            }
        }
        crate::faults::point("pack.appended");
        // Durable: now, and only now, the index may point at these bytes. A sealed pack's
        // entries are synced so that the open-pack marker can move on.
        let to_io = |e: crate::error::RepoError| PackError {
            pack: id.to_hex(),
            what: "indexing",
            source: std::io::Error::other(e.to_string()),
        };
        self.index.insert_batch(&index_batch, seal).map_err(to_io)?;
        crate::faults::point("pack.indexed");
        if seal {
            self.index.put_meta(META_OPEN_PACK, None).map_err(to_io)?;
            self.open = None;
            self.sealed += 1;
        }
        Ok(n)
    }

    /// Refuses a group commit that would leave the store's reserve short: the index and the
    /// catalog (RocksDB) keep room to write, so a full disk ends in a clear
    /// `RESOURCE_EXHAUSTED` instead of torn packs and a database in error. Nothing is written
    /// and the open pack stays usable; service resumes when space returns.
    fn check_space(&self, chunks: &[PendingChunk]) -> Result<(), PackError> {
        let need: u64 = chunks.iter().map(PendingChunk::record_len).sum();
        self.store.check_space(need).map_err(|e| PackError {
            pack: self
                .open
                .as_ref()
                .map_or_else(|| "(none open)".to_string(), |p| p.id.to_hex()),
            what: e.what,
            source: e.source,
        })
    }

    /// Abandons the open pack after a failed write or seal: it is never appended to again, and
    /// is listed for sealing at the next start (`recover_open_pack`).
    fn poison_open(&mut self) {
        if let Some(p) = self.open.take() {
            self.unrecorded_poison.push(p.id);
            if let Err(e) = self.record_poisoned() {
                tracing::error!(pack = %p.id, error = %e,
                    "cannot record the poisoned pack yet; no new pack until it is");
            }
        }
    }

    /// Adds the packs in `unrecorded_poison` to the packs the next start seals. Until this
    /// succeeds the open-pack marker still names the last of them (`create` refuses to replace
    /// it), and `rebuild-index` seals every unsealed pack.
    fn record_poisoned(&mut self) -> Result<(), crate::error::RepoError> {
        let mut list = self.index.get_meta(META_POISONED)?.unwrap_or_default();
        for id in &self.unrecorded_poison {
            list.extend_from_slice(id.as_bytes());
        }
        self.index.put_meta(META_POISONED, Some(&list))?;
        self.unrecorded_poison.clear();
        Ok(())
    }

    /// Seals the open pack, if any (graceful shutdown).
    ///
    /// # Errors
    /// As [`PackWriter::write`].
    pub async fn seal(&mut self) -> Result<(), PackError> {
        let Some(p) = self.open.as_ref() else {
            return Ok(());
        };
        if p.sink.is_empty() {
            // Nothing in it: remove the empty pack instead of sealing it.
            let id = p.id;
            self.open = None;
            let _ = self.store.discard(&id);
            let _ = self.index.put_meta(META_OPEN_PACK, None);
            return Ok(());
        }
        let res = self.write_some(&[], true).await;
        if res.is_err() {
            // Poisoned like a failed write: sealed at the next start.
            self.poison_open();
        }
        res.map(|_| ())
    }
}

/// Writes chunk `c`'s record (header, payload encrypted in place, tag) at the start of `out`;
/// answers its length.
fn seal_record(
    cipher: &dyn RecordCipher,
    seq: &mut u64,
    c: &PendingChunk,
    out: &mut [u8],
) -> usize {
    let nonce = record_nonce(*seq);
    *seq += 1;
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
    let rec = &mut out[..rec_len];
    rec[..RECORD_HEADER_LEN].copy_from_slice(&h);
    let (_, body) = rec.split_at_mut(RECORD_HEADER_LEN);
    let (payload, tag_out) = body.split_at_mut(c.data.len());
    payload.copy_from_slice(&c.data);
    let tag = cipher.seal(nonce, &h[..RECORD_AAD_LEN], payload);
    tag_out.copy_from_slice(&tag);
    rec_len
}
