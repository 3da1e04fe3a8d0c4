//! Shards: one glommio executor per core, each exclusively owning one slice of the chunk-id
//! space — its RocksDB index, its open pack writer and its AES-256-GCM keys.
//!
//! The network island talks to a shard only through [`ShardHandle`] (a bounded flume channel,
//! replies by oneshot). Nothing here takes a lock on the hot path: shard state is `Rc<RefCell>`
//! owned by one thread. What runs where is written down in `docs/concurrency.md`.
//!
//! Owns: the per-core state (need set, ingest queue, group commit, reads, and the GC's steps that
//! must be atomic with them: condemn, rewrite, seal, pack deletion) and [`Shards`], the one
//! fan-out/gather the network island uses. Must never speak gRPC nor decide access: requests
//! arrive checked, and only chunk ids, bytes and ownership keys cross the channel.

mod fanout;
mod ingest;

mod read;

pub use crate::index::NeedSet;
pub use fanout::Shards;

use coffer_proto::v1::Compression;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coffer_proto::{ChunkId, DedupKey, PackId, RepositoryId, ShardId};
use futures::channel::mpsc;
use futures::StreamExt;
use glommio::{LocalExecutorBuilder, Placement};
use tokio::sync::oneshot;

use crate::crypto::keys::MasterKey;
use crate::crypto::Encryption;
use crate::error::{ApplianceError, IngestError};
use crate::index::{ChunkIndex, OpenMode, RocksIndex};
use crate::pack::recover::recover_open_pack;
use crate::pack::store::{LocalStore, PackStore};
use crate::pack::writer::{PackWriter, PendingChunk};
use crate::repo::RepoPaths;

/// A chunk as it arrives from the network, not yet verified.
#[derive(Debug, Clone)]
pub struct IncomingChunk {
    pub id: ChunkId,
    pub raw_len: u32,
    /// `None`, `Zstd` or `Lz4`.
    pub compression: Compression,
    pub data: Bytes,
}

/// A chunk as read back: the stored form (plaintext, zstd frame or LZ4 block), already
/// authenticated.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub id: ChunkId,
    pub raw_len: u32,
    pub compression: Compression,
    pub data: Bytes,
    /// A sealed-mode envelope (record flag `FLAG_SEALED`): `data` is opaque apart from its
    /// references (`coffer_proto::sealed`).
    pub sealed: bool,
}

/// What `Need` knows of one id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Presence {
    /// Durably stored (by anyone).
    pub stored: bool,
    /// Stored, and uploaded by a session of the asking account.
    pub owned: bool,
}

/// What a put did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PutOutcome {
    pub stored: u32,
    pub deduplicated: u32,
    pub stored_bytes: u64,
}

impl std::ops::AddAssign for PutOutcome {
    fn add_assign(&mut self, o: Self) {
        self.stored += o.stored;
        self.deduplicated += o.deduplicated;
        self.stored_bytes += o.stored_bytes;
    }
}

type Reply<T> = oneshot::Sender<Result<T, ApplianceError>>;

/// Work a shard does for the network island.
#[derive(Debug)]
pub enum ShardRequest {
    /// Which of these ids are durably stored, and (with an `owner`) which the account holds.
    /// The ownership lookup covers every id, stored or not, so that its cost does not tell
    /// whether someone else stored a chunk.
    Need {
        ids: Vec<ChunkId>,
        owner: Option<[u8; 16]>,
        reply: Reply<Vec<Presence>>,
    },
    /// Verify, dedupe, encrypt, pack and index; answer once durable. With an `owner`, the
    /// account's ownership of every chunk of the request is recorded once durable.
    Put {
        chunks: Vec<IncomingChunk>,
        owner: Option<[u8; 16]>,
        reply: Reply<PutOutcome>,
    },

    /// Read chunks back.
    Get {
        ids: Vec<ChunkId>,
        reply: Reply<Vec<StoredChunk>>,
    },
    /// The stored size of each chunk (`None`: not stored), from the index alone: what a read
    /// will buffer, known before it is admitted.
    Sizes {
        ids: Vec<ChunkId>,
        reply: Reply<Vec<Option<u32>>>,
    },
    /// Sealed mode: the envelope digest of each stored chunk (`None`: not stored, or stored
    /// without one), from the index alone.
    Digests {
        ids: Vec<ChunkId>,
        reply: Reply<Vec<Option<crate::pack::format::EnvelopeDigest>>>,
    },
    /// The chunks this shard lists as damaged (C8; usually none).
    Damaged { reply: Reply<Vec<ChunkId>> },
    /// GC sweep: remove these entries from the index (one synced batch) and then from the need
    /// set, in one step of this shard's thread: no `Need` answer or ingest lookup on this shard
    /// sees one without the other. Answers how many were removed.
    Condemn {
        ids: Vec<ChunkId>,
        reply: Reply<u64>,
    },
    /// GC compaction: copy these chunks' records, as stored, into this shard's open pack; answers
    /// once they are durable and the index points at the copies.
    Rewrite {
        ids: Vec<ChunkId>,
        reply: Reply<u64>,
    },
    /// GC: seal the open pack once what is queued is written, so that the records in it can be
    /// compacted or deleted like any other (an idle appliance would keep it open for days).
    Seal { reply: Reply<()> },
    /// GC, before deleting packs: which of these this shard refuses to see deleted — packs its
    /// writer created or appended to since the run began (their records may postdate the run's
    /// count) and packs poisoned by a failed write. Only the shard's own thread knows that
    /// without a race (G8); a pack no shard refuses is never written again.
    CheckPacks {
        packs: Vec<PackId>,
        reply: Reply<Vec<PackId>>,
    },
    /// GC: delete packs that no index entry points into any more (checked with `CheckPacks` by
    /// every shard first); the shard drops its readers of them. Answers those it deleted or
    /// found gone.
    DeletePacks {
        packs: Vec<PackId>,
        reply: Reply<Vec<PackId>>,
    },
}

/// The network island's end of a shard.
#[derive(Clone)]
pub struct ShardHandle {
    tx: flume::Sender<ShardRequest>,
    /// The shard's index, for maintenance's read-only scans from its own thread (RocksDB reads
    /// are thread-safe). Every write goes through the shard.
    pub(crate) index: Arc<dyn ChunkIndex>,
}

impl std::fmt::Debug for ShardHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShardHandle")
    }
}

impl ShardHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> ShardRequest,
    ) -> Result<T, ApplianceError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send_async(make(tx))
            .await
            .map_err(|_| ApplianceError::Ingest(IngestError::ShuttingDown))?;
        rx.await
            .map_err(|_| ApplianceError::Ingest(IngestError::ShuttingDown))?
    }

    /// See [`ShardRequest::Need`].
    ///
    /// # Errors
    /// Index errors, shutdown.
    pub async fn need(
        &self,
        ids: Vec<ChunkId>,
        owner: Option<[u8; 16]>,
    ) -> Result<Vec<Presence>, ApplianceError> {
        self.call(|reply| ShardRequest::Need { ids, owner, reply })
            .await
    }

    /// See [`ShardRequest::Put`].
    ///
    /// # Errors
    /// [`IngestError`]s (bad chunks, storage failure), shutdown.
    pub async fn put(
        &self,
        chunks: Vec<IncomingChunk>,
        owner: Option<[u8; 16]>,
    ) -> Result<PutOutcome, ApplianceError> {
        self.call(|reply| ShardRequest::Put {
            chunks,
            owner,
            reply,
        })
        .await
    }

    /// See [`ShardRequest::Get`].
    ///
    /// # Errors
    /// Not found, corruption, shutdown.
    pub async fn get(&self, ids: Vec<ChunkId>) -> Result<Vec<StoredChunk>, ApplianceError> {
        self.call(|reply| ShardRequest::Get { ids, reply }).await
    }

    /// See [`ShardRequest::Sizes`].
    ///
    /// # Errors
    /// Index errors, shutdown.
    pub async fn sizes(&self, ids: Vec<ChunkId>) -> Result<Vec<Option<u32>>, ApplianceError> {
        self.call(|reply| ShardRequest::Sizes { ids, reply }).await
    }

    /// See [`ShardRequest::Digests`].
    ///
    /// # Errors
    /// Index errors, shutdown.
    pub async fn digests(
        &self,
        ids: Vec<ChunkId>,
    ) -> Result<Vec<Option<crate::pack::format::EnvelopeDigest>>, ApplianceError> {
        self.call(|reply| ShardRequest::Digests { ids, reply })
            .await
    }

    /// See [`ShardRequest::Damaged`].
    ///
    /// # Errors
    /// Shutdown.
    pub async fn damaged(&self) -> Result<Vec<ChunkId>, ApplianceError> {
        self.call(|reply| ShardRequest::Damaged { reply }).await
    }

    /// See [`ShardRequest::Condemn`].
    ///
    /// # Errors
    /// Index errors, shutdown.
    pub async fn condemn(&self, ids: Vec<ChunkId>) -> Result<u64, ApplianceError> {
        self.call(|reply| ShardRequest::Condemn { ids, reply })
            .await
    }

    /// See [`ShardRequest::Rewrite`].
    ///
    /// # Errors
    /// Read, storage and index errors, shutdown.
    pub async fn rewrite(&self, ids: Vec<ChunkId>) -> Result<u64, ApplianceError> {
        self.call(|reply| ShardRequest::Rewrite { ids, reply })
            .await
    }

    /// See [`ShardRequest::Seal`].
    ///
    /// # Errors
    /// Storage errors, shutdown.
    pub async fn seal(&self) -> Result<(), ApplianceError> {
        self.call(|reply| ShardRequest::Seal { reply }).await
    }

    /// See [`ShardRequest::CheckPacks`].
    ///
    /// # Errors
    /// Index errors, shutdown.
    pub async fn check_packs(&self, packs: Vec<PackId>) -> Result<Vec<PackId>, ApplianceError> {
        self.call(|reply| ShardRequest::CheckPacks { packs, reply })
            .await
    }

    /// See [`ShardRequest::DeletePacks`].
    ///
    /// # Errors
    /// Storage errors, shutdown.
    pub async fn delete_packs(&self, packs: Vec<PackId>) -> Result<Vec<PackId>, ApplianceError> {
        self.call(|reply| ShardRequest::DeletePacks { packs, reply })
            .await
    }
}

/// Everything a shard needs to start.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub shard: ShardId,
    /// Where the pack writer counts group commits (`None`: nowhere).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    pub cpu: Option<usize>,
    pub io_memory: usize,
    /// io_uring submission depth (the tuning plan's `ring_depth`).
    pub ring_depth: usize,
    pub paths: RepoPaths,
    pub master: Arc<MasterKey>,
    pub repo_id: RepositoryId,
    /// Sealed mode: chunks are client envelopes, checked for form only (see `ingest::verify`).
    pub sealed: bool,
    pub max_chunk: u32,
    pub pack_target: u64,
    /// Free bytes the pack writer leaves on the packs' file system (`None`: automatic).
    pub space_reserve: Option<u64>,
    pub cache_bytes: usize,
    /// Bytes of verified chunks that may wait for the next group commit.
    pub queue_limit: u64,
    /// The object store behind the local packs, if the repository has one.
    pub tier: Option<Arc<crate::pack::store::s3::Tier>>,
}

/// A running shard.
#[derive(Debug)]
pub struct RunningShard {
    pub handle: ShardHandle,
    pub join: glommio::ExecutorJoinHandle<()>,
}

/// Why a shard could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{shard}: opening its index: {source}")]
    Index {
        shard: ShardId,
        #[source]
        source: crate::error::RepoError,
    },
    #[error("{shard}: recovering the open pack: {source}")]
    Recovery {
        shard: ShardId,
        #[source]
        source: crate::pack::PackFileError,
    },
    #[error("starting {shard} (io_uring, memory lock): {why}")]
    Executor { shard: ShardId, why: String },
    #[error("{0} stopped while starting")]
    Stopped(ShardId),
}

/// Starts a shard on its own pinned executor. Returns once the shard has opened its index and
/// recovered any pack a crash left open, or with the reason it could not.
///
/// # Errors
/// Index missing or damaged, recovery failure, executor setup failure (io_uring, memlock).
pub fn spawn(cfg: ShardConfig) -> Result<RunningShard, ShardError> {
    start(cfg)?.ready()
}

/// Starts every shard at once, then waits for each: shards open their indexes and load their
/// need sets in parallel (at 10⁸ entries this is most of the start-up time).
///
/// # Errors
/// As [`spawn`], for the first shard that fails (the others then stop).
pub fn spawn_all(cfgs: Vec<ShardConfig>) -> Result<Vec<RunningShard>, ShardError> {
    let starting = cfgs.into_iter().map(start).collect::<Result<Vec<_>, _>>()?;
    starting.into_iter().map(Starting::ready).collect()
}

/// A shard whose executor runs and which is opening its index.
struct Starting {
    shard: ShardId,
    tx: flume::Sender<ShardRequest>,
    ready: std::sync::mpsc::Receiver<Result<Arc<dyn ChunkIndex>, ShardError>>,
    join: glommio::ExecutorJoinHandle<()>,
}

impl Starting {
    fn ready(self) -> Result<RunningShard, ShardError> {
        match self.ready.recv() {
            Ok(Ok(index)) => Ok(RunningShard {
                handle: ShardHandle { tx: self.tx, index },
                join: self.join,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ShardError::Stopped(self.shard)),
        }
    }
}

fn start(cfg: ShardConfig) -> Result<Starting, ShardError> {
    let (tx, rx) = flume::bounded(256);
    let (ready_tx, ready_rx) =
        std::sync::mpsc::channel::<Result<Arc<dyn ChunkIndex>, ShardError>>();
    let placement = cfg.cpu.map_or(Placement::Unbound, Placement::Fixed);
    let shard = cfg.shard;
    let name = shard.to_string();
    let join = LocalExecutorBuilder::new(placement)
        .name(&name)
        .io_memory(cfg.io_memory)
        .ring_depth(cfg.ring_depth.max(1))
        .spawn(move || async move {
            match ShardState::open(&cfg) {
                Ok((state, writer)) => {
                    let _ = ready_tx.send(Ok(state.index.clone()));
                    run(state, writer, rx).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| ShardError::Executor {
            shard,
            why: e.to_string(),
        })?;
    Ok(Starting {
        shard,
        tx,
        ready: ready_rx,
        join,
    })
}

struct Queue {
    chunks: Vec<PendingChunk>,
    /// Generation of the group commit now being filled.
    gen: u64,
    /// Chunks queued or being written, and the generation that will make them durable.
    inflight: HashMap<ChunkId, u64>,
    waiters: HashMap<u64, Vec<oneshot::Sender<Result<(), IngestError>>>>,
}

pub(crate) struct ShardState {
    pub(crate) index: Arc<dyn ChunkIndex>,
    pub(crate) dedup_key: DedupKey,
    /// Sealed mode (see [`ShardConfig::sealed`]).
    pub(crate) sealed: bool,
    pub(crate) max_chunk: u32,
    /// Where this shard's packs live (shared with its pack writer).
    pub(crate) store: Rc<LocalStore>,
    pub(crate) encryption: Arc<dyn Encryption>,
    q: RefCell<Queue>,
    bell: RefCell<Option<mpsc::UnboundedSender<()>>>,
    /// Callers waiting for the open pack to be sealed (see [`ShardRequest::Seal`]).
    seal_waiters: RefCell<Vec<oneshot::Sender<Result<(), IngestError>>>>,
    pub(crate) budget: Rc<glommio::sync::Semaphore>,
    pub(crate) budget_kib: u64,
    /// Ids durably stored on this shard (see `need`).
    need: RefCell<NeedSet>,
    /// Stored chunks whose records are damaged (see [`crate::index::META_DAMAGED`]).
    damaged: RefCell<std::collections::HashSet<ChunkId>>,
    active: Cell<usize>,
    /// Packs the writer created or appended to since the GC's run began (never deleted in it).
    written: Rc<RefCell<std::collections::HashSet<PackId>>>,
}

impl ShardState {
    fn open(cfg: &ShardConfig) -> Result<(Rc<Self>, PackWriter), ShardError> {
        let shard = cfg.shard;
        let index_err = |source| ShardError::Index { shard, source };
        let index: Arc<dyn ChunkIndex> = Arc::new(
            RocksIndex::open(
                &cfg.paths.shard_index(cfg.shard),
                OpenMode::Existing,
                cfg.cache_bytes,
            )
            .map_err(index_err)?,
        );
        let recovered = recover_open_pack(&cfg.paths, cfg.master.as_ref(), index.as_ref())
            .map_err(|source| ShardError::Recovery { shard, source })?;
        if recovered > 0 {
            tracing::info!(
                shard = %cfg.shard,
                recovered,
                "sealed the pack left open by a crash"
            );
        }
        let store = Rc::new(
            LocalStore::new(cfg.paths.clone(), cfg.space_reserve).with_tier(cfg.tier.clone()),
        );
        let encryption: Arc<dyn Encryption> = cfg.master.clone();
        let mut writer = PackWriter::new(
            store.clone(),
            encryption.clone(),
            index.clone(),
            cfg.shard,
            cfg.repo_id,
            cfg.pack_target,
        );
        writer.metrics.clone_from(&cfg.metrics);
        let need = NeedSet::load(index.as_ref()).map_err(index_err)?;
        let damaged = crate::index::damaged(index.as_ref()).map_err(index_err)?;
        if !damaged.is_empty() {
            tracing::warn!(
                shard = %cfg.shard,
                chunks = damaged.len(),
                "damaged chunks are answered missing until a backup uploads their data again"
            );
        }
        tracing::info!(shard = %cfg.shard, chunks = need.len(), "index loaded");
        let budget_kib = (cfg.queue_limit >> 10).max(64 << 10);
        let state = Rc::new(Self {
            index,
            dedup_key: cfg.master.dedup_key(),
            sealed: cfg.sealed,
            max_chunk: cfg.max_chunk,
            store,
            encryption,
            q: RefCell::new(Queue {
                chunks: Vec::new(),
                gen: 1,
                inflight: HashMap::new(),
                waiters: HashMap::new(),
            }),
            bell: RefCell::new(None),
            seal_waiters: RefCell::new(Vec::new()),
            budget: Rc::new(glommio::sync::Semaphore::new(budget_kib)),
            budget_kib,
            need: RefCell::new(need),
            damaged: RefCell::new(damaged),
            active: Cell::new(0),
            written: writer.written(),
        });
        Ok((state, writer))
    }

    /// Whether `id`'s record is known to be damaged.
    pub(crate) fn is_damaged(&self, id: &ChunkId) -> bool {
        self.damaged.borrow().contains(id)
    }

    /// Records a damaged chunk (bit rot found by a read): durably, so that `Need` answers it
    /// missing from now on, and after a restart.
    pub(crate) fn mark_damaged(&self, id: ChunkId) {
        let mut d = self.damaged.borrow_mut();
        if d.insert(id) {
            tracing::error!(chunk = %id, "damaged record: answered missing until a backup uploads it again");
            if let Err(e) = crate::index::set_damaged(self.index.as_ref(), &d) {
                tracing::error!(error = %e, "cannot record a damaged chunk");
            }
        }
    }

    /// Records sealed records that an upload of a different envelope replaced (S1 in sealed
    /// mode: one of the two was poisoned), with the replaced index entry, for `verify` to report
    /// ([`crate::index::META_REPLACED`]).
    pub(crate) fn replaced(
        &self,
        old: &[(ChunkId, crate::pack::format::IndexEntry)],
    ) -> Result<(), crate::error::RepoError> {
        for (id, e) in old {
            tracing::warn!(
                chunk = %id,
                old_pack = %e.pack,
                "a sealed record was replaced by an upload of a different envelope (one of them \
                 was poisoned); `verify` reports it"
            );
        }
        crate::index::add_replaced(self.index.as_ref(), old, crate::clock::now_us())
    }

    /// Takes chunks off the damaged list once a new record of each is durable and indexed.
    pub(crate) fn healed(&self, ids: &[ChunkId]) -> Result<(), crate::error::RepoError> {
        let mut d = self.damaged.borrow_mut();
        let before = d.len();
        for id in ids {
            d.remove(id);
        }
        if d.len() != before {
            tracing::info!(
                chunks = before - d.len(),
                "damaged chunks replaced by new uploads"
            );
            crate::index::set_damaged(self.index.as_ref(), &d)?;
        }
        Ok(())
    }

    /// Queues verified chunks that are not durable yet and returns the generations to wait for.
    /// Synchronous: nothing else runs on this shard in between, so a chunk is queued at most once.
    pub(crate) fn enqueue(
        &self,
        candidates: Vec<PendingChunk>,
        outcome: &mut PutOutcome,
    ) -> Vec<oneshot::Receiver<Result<(), IngestError>>> {
        let mut q = self.q.borrow_mut();
        let gen = q.gen;
        let mut gens = Vec::new();
        let mut pushed = false;
        for c in candidates {
            if let Some(&g) = q.inflight.get(&c.id) {
                outcome.deduplicated += 1;
                gens.push(g);
            } else {
                outcome.stored += 1;
                outcome.stored_bytes += c.data.len() as u64;
                q.inflight.insert(c.id, gen);
                q.chunks.push(c);
                pushed = true;
                gens.push(gen);
            }
        }
        gens.sort_unstable();
        gens.dedup();
        let rx = gens
            .into_iter()
            .map(|g| {
                let (tx, rx) = oneshot::channel();
                q.waiters.entry(g).or_default().push(tx);
                rx
            })
            .collect();
        drop(q);
        if pushed {
            if let Some(bell) = self.bell.borrow().as_ref() {
                let _ = bell.unbounded_send(());
            }
        }
        rx
    }
}

async fn run(state: Rc<ShardState>, writer: PackWriter, rx: flume::Receiver<ShardRequest>) {
    let (bell_tx, bell_rx) = mpsc::unbounded();
    *state.bell.borrow_mut() = Some(bell_tx);
    let packer = glommio::spawn_local(pack_loop(state.clone(), writer, bell_rx));
    // Lookups (`Need`, `Sizes`) answer from memory in microseconds, but a client waits on each
    // before it uploads: they run in a queue of their own whose latency matters, so that an
    // upload's verification or a read's decryption yields to them within ~1 ms (glommio lowers
    // its preemption timer to the smallest latency asked) instead of after the default 100 ms.
    let ex = glommio::executor();
    let lookups = ex.create_task_queue(
        glommio::Shares::Static(1000),
        glommio::Latency::Matters(Duration::from_millis(1)),
        "lookups",
    );
    let bulk = ex.create_task_queue(
        glommio::Shares::Static(100),
        glommio::Latency::NotImportant,
        "bulk",
    );
    while let Ok(req) = rx.recv_async().await {
        let st = state.clone();
        st.active.set(st.active.get() + 1);
        let queue = match req {
            ShardRequest::Need { .. }
            | ShardRequest::Sizes { .. }
            | ShardRequest::Digests { .. }
            | ShardRequest::Damaged { .. } => lookups,
            _ => bulk,
        };
        let task = async move {
            handle(&st, req).await;
            st.active.set(st.active.get() - 1);
        };
        match glommio::spawn_local_into(task, queue) {
            Ok(t) => {
                t.detach();
            }
            Err(e) => {
                // Its reply is dropped: the caller sees the shard as stopped.
                state.active.set(state.active.get() - 1);
                tracing::error!(error = %e, "cannot schedule a shard request");
            }
        }
    }
    // Every handle is gone: let requests in progress finish, then seal.
    while state.active.get() > 0 {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    state.bell.borrow_mut().take();
    packer.await;
}

async fn handle(state: &Rc<ShardState>, req: ShardRequest) {
    match req {
        ShardRequest::Need { ids, owner, reply } => {
            let owned = match owner {
                Some(o) => state.index.owned(&o, &ids).map_err(|e| {
                    ApplianceError::Internal(format!("reading ownership records: {e}"))
                }),
                None => Ok(vec![false; ids.len()]),
            };
            let need = state.need.borrow();
            let damaged = state.damaged.borrow();
            let _ = reply.send(owned.map(|owned| {
                ids.iter()
                    .zip(owned)
                    .map(|(id, owned)| {
                        // A damaged record is as good as none: the client sends the data again.
                        let stored = need.contains(id) && !damaged.contains(id);
                        Presence {
                            stored,
                            owned: stored && owned,
                        }
                    })
                    .collect()
            }));
        }
        ShardRequest::Put {
            chunks,
            owner,
            reply,
        } => {
            let _ = reply.send(
                ingest::put(state, chunks, owner)
                    .await
                    .map_err(ApplianceError::from),
            );
        }

        ShardRequest::Get { ids, reply } => {
            let _ = reply.send(get_retrying(state, &ids).await);
        }
        ShardRequest::Damaged { reply } => {
            let _ = reply.send(Ok(state.damaged.borrow().iter().copied().collect()));
        }
        ShardRequest::Sizes { ids, reply } => {
            let _ = reply.send(
                state
                    .index
                    .get_many(&ids)
                    .map(|es| es.into_iter().map(|e| e.map(|e| e.len)).collect())
                    .map_err(|e| ApplianceError::Internal(e.to_string())),
            );
        }
        ShardRequest::Digests { ids, reply } => {
            let _ = reply.send(
                state
                    .index
                    .get_many(&ids)
                    .map(|es| es.into_iter().map(|e| e.and_then(|e| e.digest)).collect())
                    .map_err(|e| ApplianceError::Internal(e.to_string())),
            );
        }
        ShardRequest::Condemn { ids, reply } => {
            let _ = reply.send(condemn(state, &ids));
        }
        ShardRequest::Rewrite { ids, reply } => {
            let _ = reply.send(
                ingest::rewrite(state, &ids)
                    .await
                    .map_err(ApplianceError::from),
            );
        }
        ShardRequest::Seal { reply } => {
            let (tx, rx) = oneshot::channel();
            state.seal_waiters.borrow_mut().push(tx);
            if let Some(bell) = state.bell.borrow().as_ref() {
                let _ = bell.unbounded_send(());
            }
            let res = match rx.await {
                Ok(r) => r.map_err(ApplianceError::from),
                Err(_) => Err(ApplianceError::Ingest(IngestError::ShuttingDown)),
            };
            let _ = reply.send(res);
        }
        ShardRequest::CheckPacks { packs, reply } => {
            let _ = reply.send(refused_packs(state, &packs));
        }
        ShardRequest::DeletePacks { packs, reply } => {
            let _ = reply.send(delete_packs(state, packs));
        }
    }
}

/// Reads chunks; a read that failed while the GC deleted a pack (the chunk was just moved by
/// compaction) looks its chunks up again.
async fn get_retrying(
    state: &Rc<ShardState>,
    ids: &[ChunkId],
) -> Result<Vec<StoredChunk>, ApplianceError> {
    let mut tries = 0;
    loop {
        let before = PACK_DELETIONS.load(Ordering::SeqCst);
        match read::get(state, ids).await {
            Err(ApplianceError::Internal(_))
                if PACK_DELETIONS.load(Ordering::SeqCst) != before && tries < 3 =>
            {
                tries += 1;
            }
            r => return r,
        }
    }
}

/// Packs deleted by any shard so far, process-wide: a read on any shard that fails while this
/// moved (its chunk was just moved by compaction, and the old pack unlinked, perhaps by another
/// shard) looks its chunks up again.
static PACK_DELETIONS: AtomicU64 = AtomicU64::new(0);

/// See [`ShardRequest::CheckPacks`]. Synchronous: the writer cannot start a pack in between.
fn refused_packs(state: &ShardState, packs: &[PackId]) -> Result<Vec<PackId>, ApplianceError> {
    let poisoned = state
        .index
        .get_meta(crate::index::META_POISONED)
        .map_err(|e| ApplianceError::Internal(format!("reading the poisoned packs: {e}")))?
        .unwrap_or_default();
    let written = state.written.borrow();
    Ok(packs
        .iter()
        .filter(|p| written.contains(*p) || poisoned.chunks_exact(16).any(|c| c == p.as_bytes()))
        .copied()
        .collect())
}

/// See [`ShardRequest::DeletePacks`]. Refuses again what this shard would refuse (defence in
/// depth: the caller checked every shard first).
fn delete_packs(state: &ShardState, packs: Vec<PackId>) -> Result<Vec<PackId>, ApplianceError> {
    let refused = refused_packs(state, &packs)?;
    let mut done = Vec::with_capacity(packs.len());
    for p in packs {
        if refused.contains(&p) {
            tracing::warn!(pack = %p, "gc: not deleting a pack written during this run or poisoned");
            continue;
        }
        PACK_DELETIONS.fetch_add(1, Ordering::SeqCst);
        state
            .store
            .delete(&p)
            .map_err(|e| ApplianceError::Internal(format!("pack {p}: {e}")))?;
        PACK_DELETIONS.fetch_add(1, Ordering::SeqCst);
        crate::faults::point("shard.pack-deleted");
        done.push(p);
    }
    Ok(done)
}

/// See [`ShardRequest::Condemn`]. Synchronous: nothing else runs on this shard in between.
fn condemn(state: &ShardState, ids: &[ChunkId]) -> Result<u64, ApplianceError> {
    state
        .index
        .delete_batch(ids, true)
        .map_err(|e| ApplianceError::Internal(format!("removing index entries: {e}")))?;
    crate::faults::point("shard.condemn.indexed");
    let mut need = state.need.borrow_mut();
    for id in ids {
        need.remove(id);
    }
    Ok(ids.len() as u64)
}

/// The pack stage: one group commit per turn of the loop. While one commit is being written and
/// fsynced, new chunks gather in the queue for the next.
async fn pack_loop(
    state: Rc<ShardState>,
    mut writer: PackWriter,
    mut bell: mpsc::UnboundedReceiver<()>,
) {
    loop {
        let closed = bell.next().await.is_none();
        loop {
            let (batch, gen) = {
                let mut q = state.q.borrow_mut();
                if q.chunks.is_empty() {
                    break;
                }
                let g = q.gen;
                q.gen += 1;
                (std::mem::take(&mut q.chunks), g)
            };
            let res = writer.write(&batch).await.map_err(|e| {
                if e.is_no_space() {
                    IngestError::NoSpace(e.to_string())
                } else {
                    IngestError::Storage(e.to_string())
                }
            });
            match &res {
                Err(e @ IngestError::NoSpace(_)) => {
                    tracing::error!(error = %e, "group commit refused: the disk is full");
                }
                Err(e) => {
                    tracing::error!(error = %e, "group commit failed; the pack is poisoned and abandoned");
                }
                Ok(()) => {}
            }
            if res.is_ok() {
                let mut need = state.need.borrow_mut();
                for c in &batch {
                    need.insert(&c.id);
                }
            }
            let mut q = state.q.borrow_mut();
            for c in &batch {
                if q.inflight.get(&c.id) == Some(&gen) {
                    q.inflight.remove(&c.id);
                }
            }
            for w in q.waiters.remove(&gen).unwrap_or_default() {
                let _ = w.send(res.clone());
            }
        }
        let waiters = std::mem::take(&mut *state.seal_waiters.borrow_mut());
        if !waiters.is_empty() {
            let res = writer.seal().await.map_err(|e| {
                tracing::error!(error = %e, "sealing the open pack for maintenance failed");
                IngestError::Storage(e.to_string())
            });
            if res.is_ok() {
                // A GC run begins: from now on it may not delete what this writer touches.
                state.written.borrow_mut().clear();
            }
            for w in waiters {
                let _ = w.send(res.clone());
            }
        }
        if closed {
            if let Err(e) = writer.seal().await {
                tracing::error!(error = %e, "sealing the open pack at shutdown failed");
            }
            break;
        }
    }
}
