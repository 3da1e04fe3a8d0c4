//! The network island: tonic over rustls. Handlers authenticate, split batches by shard and hand
//! them to shards through [`ShardHandle`]s. They never touch RocksDB indexes or pack files.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use coffer_proto::v1::{self, coffer_server::Coffer};
use coffer_proto::{bitmap_len, bitmap_set, unpack_ids, ChunkId, ShardId, SnapshotId};
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status, Streaming};

use crate::access::rules::snapshot_access;
use crate::access::rules::{self, Access, TargetType};
use crate::access::auth::{Auth, Reach, Session, SessionState};
use crate::catalog::Catalog;
use crate::error::ApplianceError;
use crate::shard::{IncomingChunk, Presence, PutOutcome, ShardHandle, StoredChunk};

/// Batches of one stream processed concurrently (pipelining; answers stay in order).
const PIPELINE_DEPTH: usize = 4;

/// What `Hello` tells a client.
#[derive(Debug, Clone)]
pub struct HelloInfo {
    pub repository_id: [u8; 16],
    pub chunker: v1::ChunkerParams,
    pub dedup_key: [u8; 32],
    pub limits: v1::Limits,
}

/// The `coffer.v1.Coffer` service.
#[derive(Debug, Clone)]
pub struct CofferService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Vec<ShardHandle>,
    catalog: Arc<Catalog>,
    auth: Arc<Auth>,
    hello: HelloInfo,
    /// Reachable sets of recently opened or committed snapshots, most recent last.
    /// Keyed by root: snapshots of the same tree share one set.
    reach_cache: std::sync::Mutex<Vec<(ChunkId, Arc<Reach>)>>,
    /// Tree walks running at once, appliance-wide.
    walks: Arc<Semaphore>,
    /// One tree walk at a time per account.
    user_walks: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Tree walks (commit checks, snapshot opens) running at once, appliance-wide.
const WALKS: usize = 4;
/// Ids one `GetChunks` message may ask for (the client sends 256): with [`PIPELINE_DEPTH`]
/// messages in flight, a stream holds at most 4 × 256 × the maximum chunk size.
const GET_IDS_PER_MESSAGE: usize = 256;
/// Chunks a walk reads at once, whatever a client uploaded: at most 1,024 × the maximum chunk
/// size of tree objects (real trees are a few KiB: the Linux tree's levels take one or two
/// fetches; 128 per fetch made opening it ~8 % slower), and 32 list chunks (8 MiB).
const WALK_TREES_PER_FETCH: usize = 1024;
const WALK_LISTS_PER_FETCH: usize = 32;

/// Snapshots whose reachable sets stay cached (a Linux-tree snapshot's set is ~5 MB).
const REACH_CACHE: usize = 8;
/// Most trees and chunks one snapshot may reach (a bound on what a malicious tree can cost).
const MAX_REACH: usize = 50_000_000;

/// What a walk from a snapshot root found.
#[derive(Debug, Default)]
struct Walk {
    reach: Reach,
    /// Whether some subtree was not descended into.
    skipped: bool,
}

/// The plaintext of a stored chunk.
fn plaintext(c: &StoredChunk) -> Result<Bytes, ApplianceError> {
    if c.compression == v1::Compression::None {
        return Ok(c.data.clone());
    }
    coffer_proto::codec::decode(c.compression, &c.data, c.raw_len as usize)
        .map(Bytes::from)
        .map_err(|e| ApplianceError::Internal(format!("chunk {}: {e}", c.id)))
}

/// The references of one tree object: trees to walk next (`next`, subtrees), leaves (file
/// chunks, bundles) and list chunks.
#[derive(Debug, Default)]
struct TreeRefs {
    trees: Vec<ChunkId>,
    leaves: Vec<ChunkId>,
    lists: Vec<ChunkId>,
}

/// Decodes tree objects into their references (CPU work: run on the blocking pool). Errors name
/// the tree, which the caller may read.
fn tree_refs(chunks: &[StoredChunk]) -> Result<Vec<TreeRefs>, ApplianceError> {
    let bad = |e: String| ApplianceError::FailedPrecondition(e);
    chunks
        .iter()
        .map(|c| {
            let t = v1::Tree::decode(&plaintext(c)?[..])
                .map_err(|e| bad(format!("chunk {} is not a tree object: {e}", c.id)))?;
            let id_of = |b: &Bytes| {
                ChunkId::from_slice(b).map_err(|e| bad(format!("tree {}: bad id: {e}", c.id)))
            };
            let packed = |b: &Bytes| {
                unpack_ids(b, usize::MAX).map_err(|e| bad(format!("tree {}: {e}", c.id)))
            };
            let mut r = TreeRefs::default();
            if !t.next.is_empty() {
                r.trees.push(id_of(&t.next)?);
            }
            for n in &t.nodes {
                if !n.subtree.is_empty() {
                    r.trees.push(id_of(&n.subtree)?);
                }
                r.leaves.extend(packed(&n.chunks)?);
                if !n.bundle.is_empty() {
                    r.leaves.push(id_of(&n.bundle)?);
                }
                r.lists.extend(packed(&n.chunk_lists)?);
            }
            Ok(r)
        })
        .collect()
}

/// Decodes list chunks into the chunk ids they hold (CPU work: run on the blocking pool).
fn list_refs(chunks: &[StoredChunk]) -> Result<Vec<ChunkId>, ApplianceError> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend(unpack_ids(&plaintext(c)?, usize::MAX).map_err(|e| {
            ApplianceError::FailedPrecondition(format!("list chunk {}: {e}", c.id))
        })?);
    }
    Ok(out)
}

impl CofferService {
    #[must_use]
    pub fn new(
        shards: Vec<ShardHandle>,
        catalog: Arc<Catalog>,
        auth: Arc<Auth>,
        hello: HelloInfo,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                shards,
                catalog,
                auth,
                hello,
                reach_cache: std::sync::Mutex::new(Vec::new()),
                walks: Arc::new(Semaphore::new(WALKS)),
                user_walks: std::sync::Mutex::new(HashMap::new()),
            }),
        }
    }
}

fn shard_count(shards: &[ShardHandle]) -> u16 {
    u16::try_from(shards.len()).expect("shard count comes from a u16")
}

/// Splits `items` by shard, remembering each item's position.
fn split<T>(shards: u16, items: Vec<T>, id: impl Fn(&T) -> ChunkId) -> Vec<(Vec<usize>, Vec<T>)> {
    let mut out: Vec<(Vec<usize>, Vec<T>)> =
        (0..shards).map(|_| (Vec::new(), Vec::new())).collect();
    for (i, item) in items.into_iter().enumerate() {
        let s = ShardId::for_chunk(&id(&item), shards).index();
        out[s].0.push(i);
        out[s].1.push(item);
    }
    out
}

impl Inner {
    fn any_session<T>(&self, req: &Request<T>) -> Result<Session, Status> {
        let token = req
            .metadata()
            .get(coffer_proto::SESSION_HEADER)
            .and_then(|v| v.to_str().ok());
        Ok(self.auth.session(token)?)
    }

    /// A user's session: the server control user may only refresh and read status.
    fn session<T>(&self, req: &Request<T>) -> Result<Session, Status> {
        let s = self.any_session(req)?;
        if s.control {
            return Err(Status::permission_denied(
                "the server control user may only call Refresh and ServerStatus",
            ));
        }
        Ok(s)
    }

    fn control_session<T>(&self, req: &Request<T>) -> Result<Session, Status> {
        let s = self.any_session(req)?;
        if !s.control {
            return Err(Status::permission_denied(
                "only the server control user may call this",
            ));
        }
        Ok(s)
    }

    async fn find_missing(
        &self,
        session: &Session,
        ids: Bytes,
    ) -> Result<v1::FindMissingResponse, ApplianceError> {
        let max = self.hello.limits.max_ids_per_batch as usize;
        let ids =
            unpack_ids(&ids, max).map_err(|e| ApplianceError::InvalidArgument(e.to_string()))?;
        let n = ids.len();
        let parts = split(shard_count(&self.shards), ids.clone(), |id| *id);
        let owner = session.state.owner;
        let answers = futures::future::try_join_all(
            parts
                .into_iter()
                .zip(&self.shards)
                .filter(|((pos, _), _)| !pos.is_empty())
                .map(|((pos, ids), shard)| async move {
                    Ok::<_, ApplianceError>((pos, shard.need(ids, owner).await?))
                }),
        )
        .await?;
        let mut present = vec![Presence::default(); n];
        for (pos, p) in answers {
            for (i, p) in pos.into_iter().zip(p) {
                present[i] = p;
            }
        }
        let disclosure = self.auth.disclosure();
        let mut missing = vec![0u8; bitmap_len(n)];
        let mut prove = vec![0u8; bitmap_len(n)];
        let mut adopted = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let p = present[i];
            if p.stored && session.state.knows(id) {
                continue;
            }
            if p.owned {
                // Uploaded by an earlier session of this account (an interrupted backup): the
                // account's own data, so this session knows it without sending it again.
                adopted.push(*id);
                continue;
            }
            if p.stored && disclosure == v1::Disclosure::Repository {
                bitmap_set(&mut prove, i);
            } else {
                // Stored by someone else but unknown to this session: answered exactly like a
                // chunk nobody holds (user disclosure).
                bitmap_set(&mut missing, i);
            }
        }
        session.state.add_uploaded(adopted);
        Ok(v1::FindMissingResponse {
            missing: missing.into(),
            count: u32::try_from(n).unwrap_or(u32::MAX),
            prove: prove.into(),
        })
    }

    /// Checks possession proofs: keyed BLAKE3 of each chunk's plaintext under the session's key.
    /// Only in `repository` disclosure (in `user` disclosure a proof would tell whether someone
    /// stored the chunk); a proof for a chunk that is not stored and a wrong proof get the same
    /// answer.
    async fn check_proofs(
        &self,
        session: &Session,
        proofs: Vec<(ChunkId, Bytes)>,
    ) -> Result<(), ApplianceError> {
        if self.auth.disclosure() != v1::Disclosure::Repository {
            return Err(ApplianceError::InvalidArgument(
                "possession proofs are accepted only in `repository` disclosure; send the \
                 chunks' data instead"
                    .into(),
            ));
        }
        let rejected = || {
            ApplianceError::InvalidArgument(format!(
                "possession proofs rejected: one of the {} proofs in this batch does not match a \
                 stored chunk; send the data instead",
                proofs.len()
            ))
        };
        let ids: Vec<ChunkId> = proofs.iter().map(|p| p.0).collect();
        let stored = self.fetch(ids.clone()).await.map_err(|e| match e {
            ApplianceError::NotFound(_) => rejected(),
            e => e,
        })?;
        for ((_, proof), c) in proofs.iter().zip(stored) {
            let want = blake3::keyed_hash(&session.state.possession_key, &plaintext(&c)?);
            if want.as_bytes()[..] != proof[..] {
                return Err(rejected());
            }
        }
        session.state.add_uploaded(ids);
        Ok(())
    }

    async fn put(
        &self,
        session: &Session,
        req: v1::PutChunksRequest,
    ) -> Result<v1::PutChunksResponse, ApplianceError> {
        let max = self.hello.limits.max_chunks_per_batch as usize;
        if req.chunks.len() > max {
            return Err(ApplianceError::InvalidArgument(format!(
                "{} chunks in one batch; at most {max}",
                req.chunks.len()
            )));
        }
        let mut chunks = Vec::with_capacity(req.chunks.len());
        let mut proofs = Vec::new();
        for f in req.chunks {
            let id = ChunkId::from_slice(&f.id)
                .map_err(|e| ApplianceError::InvalidArgument(format!("chunk id: {e}")))?;
            let compression = match v1::Compression::try_from(f.compression) {
                Ok(c @ (v1::Compression::None | v1::Compression::Zstd | v1::Compression::Lz4)) => c,
                Ok(v1::Compression::Proof) => {
                    proofs.push((id, f.data));
                    continue;
                }
                Err(_) => {
                    return Err(ApplianceError::InvalidArgument(format!(
                        "chunk {id}: unknown compression {}",
                        f.compression
                    )))
                }
            };
            chunks.push(IncomingChunk {
                id,
                raw_len: f.raw_len,
                compression,
                data: f.data,
            });
        }
        if !proofs.is_empty() {
            self.check_proofs(session, proofs).await?;
        }
        // What an upload of data nobody holds would be answered: new to this session means
        // stored (user disclosure hides whether someone else had it).
        let mut masked = PutOutcome::default();
        let mut seen = HashSet::new();
        for c in &chunks {
            if session.state.knows(&c.id) || !seen.insert(c.id) {
                masked.deduplicated += 1;
            } else {
                masked.stored += 1;
                masked.stored_bytes += c.data.len() as u64;
            }
        }
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        let parts = split(shard_count(&self.shards), chunks, |c| c.id);
        let outcomes = futures::future::try_join_all(
            parts
                .into_iter()
                .zip(&self.shards)
                .filter(|((pos, _), _)| !pos.is_empty())
                .map(|((_, chunks), shard)| shard.put(chunks, session.state.owner)),
        )
        .await?;
        // Verified against their ids and durable: the session holds these chunks.
        session.state.add_uploaded(ids);
        let mut total = PutOutcome::default();
        for o in outcomes {
            total += o;
        }
        if self.auth.disclosure() == v1::Disclosure::User {
            total = masked;
        }
        Ok(v1::PutChunksResponse {
            batch: req.batch,
            stored: total.stored,
            deduplicated: total.deduplicated,
            stored_bytes: total.stored_bytes,
        })
    }

    /// Stored chunks in request order.
    async fn fetch(&self, ids: Vec<ChunkId>) -> Result<Vec<StoredChunk>, ApplianceError> {
        let n = ids.len();
        let parts = split(shard_count(&self.shards), ids, |id| *id);
        let answers = futures::future::try_join_all(
            parts
                .into_iter()
                .zip(&self.shards)
                .filter(|((pos, _), _)| !pos.is_empty())
                .map(|((pos, ids), shard)| async move {
                    Ok::<_, ApplianceError>((pos, shard.get(ids).await?))
                }),
        )
        .await?;
        let mut ordered: Vec<Option<StoredChunk>> = vec![None; n];
        for (pos, chunks) in answers {
            for (i, c) in pos.into_iter().zip(chunks) {
                ordered[i] = Some(c);
            }
        }
        Ok(ordered.into_iter().flatten().collect())
    }

    /// `GetChunks` for one message: only chunks the session knows (uploaded, proved, or
    /// reachable from a snapshot it opened); any other id is answered exactly like a chunk
    /// that is not stored.
    async fn get(
        &self,
        session: &Session,
        ids: Bytes,
    ) -> Result<Vec<v1::GetChunksResponse>, ApplianceError> {
        // Each message is answered from memory: its size is bounded by ids, not by the request.
        let ids = unpack_ids(&ids, GET_IDS_PER_MESSAGE).map_err(|e| {
            ApplianceError::InvalidArgument(format!(
                "GetChunks: {e} (at most {GET_IDS_PER_MESSAGE} ids per message)"
            ))
        })?;
        if let Some(id) = ids.iter().find(|id| !session.state.knows(id)) {
            return Err(ApplianceError::NotFound(format!(
                "chunk {id} is not stored (or not reachable from a snapshot this session opened)"
            )));
        }
        let ordered = self.fetch(ids).await?;
        // Split the answer so that no message exceeds half the message limit.
        let budget = (self.hello.limits.max_message_size / 2) as usize;
        let mut out = Vec::new();
        let mut cur = v1::GetChunksResponse::default();
        let mut cur_bytes = 0;
        for c in ordered {
            if !cur.chunks.is_empty() && cur_bytes + c.data.len() > budget {
                out.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
            cur_bytes += c.data.len();
            cur.chunks.push(v1::ChunkFrame {
                id: Bytes::copy_from_slice(c.id.as_bytes()),
                raw_len: c.raw_len,
                compression: c.compression.into(),
                data: c.data,
            });
        }
        if !cur.chunks.is_empty() || out.is_empty() {
            out.push(cur);
        }
        Ok(out)
    }
}

impl Inner {
    /// Walks the trees from `root` level by level.
    ///
    /// With `session` (the commit check) the walk reads only chunks the session knows: a subtree
    /// reachable from a snapshot it opened is not descended into, and any other chunk it does not
    /// know ends the walk *before that chunk is read* — so nothing of someone else's data is
    /// decoded or quoted, and the answer is the same whether or not the chunk is stored (the
    /// disclosure rule of `error.rs`). Memory is bounded by [`MAX_REACH`], checked at every
    /// insertion, and by the chunks the session knows.
    async fn walk(
        &self,
        root: ChunkId,
        session: Option<&SessionState>,
    ) -> Result<Walk, ApplianceError> {
        let bad = |e: String| ApplianceError::FailedPrecondition(e);
        let knows = |id: &ChunkId| -> Result<(), ApplianceError> {
            if session.is_none_or(|s| s.knows(id)) {
                Ok(())
            } else {
                Err(bad(format!(
                    "it references chunk {id}, which this session neither uploaded, proved nor \
                     opened; upload it or open the snapshot it comes from"
                )))
            }
        };
        let bounded = |w: &Walk| -> Result<(), ApplianceError> {
            if w.reach.len() > MAX_REACH {
                Err(bad(format!(
                    "a snapshot may reach at most {MAX_REACH} chunks"
                )))
            } else {
                Ok(())
            }
        };
        let mut w = Walk::default();
        let mut level = vec![root];
        while !level.is_empty() {
            let mut todo = Vec::new();
            for id in level {
                if session.is_some_and(|s| s.opened_tree(&id)) {
                    w.skipped = true;
                    continue;
                }
                knows(&id)?;
                if w.reach.trees.insert(id) {
                    bounded(&w)?;
                    todo.push(id);
                }
            }
            let mut next = Vec::new();
            let mut lists = Vec::new();
            for part in todo.chunks(WALK_TREES_PER_FETCH) {
                let chunks = self.fetch(part.to_vec()).await?;
                // Decompressing and decoding is CPU work: on the blocking pool, not on the
                // network threads (at most `WALKS` walks run at once).
                let refs = on_blocking_pool("tree decoding", move || tree_refs(&chunks)).await?;
                for r in refs {
                    next.extend(r.trees);
                    for id in r.leaves {
                        knows(&id)?;
                        if w.reach.leaves.insert(id) {
                            bounded(&w)?;
                        }
                    }
                    for id in r.lists {
                        knows(&id)?;
                        if w.reach.leaves.insert(id) {
                            bounded(&w)?;
                            lists.push(id);
                        }
                    }
                }
            }
            for part in lists.chunks(WALK_LISTS_PER_FETCH) {
                let chunks = self.fetch(part.to_vec()).await?;
                let ids = on_blocking_pool("list decoding", move || list_refs(&chunks)).await?;
                for id in ids {
                    knows(&id)?;
                    if w.reach.leaves.insert(id) {
                        bounded(&w)?;
                    }
                }
            }
            level = next;
        }
        Ok(w)
    }

    /// Waits for this account's turn to walk trees (one walk per account at a time) and for one
    /// of the appliance's walk slots: a flood of commits costs its sender, not everyone.
    async fn walk_permit(
        &self,
        identity: &str,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), ApplianceError> {
        let mine = {
            let mut m = self
                .user_walks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if m.len() > 4096 {
                // Forget accounts with no walk in progress (deleted ones among them).
                m.retain(|_, s| Arc::strong_count(s) > 1);
            }
            m.entry(identity.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(1)))
                .clone()
        };
        let closed = |_| ApplianceError::Unavailable("the appliance is shutting down".into());
        let mine = mine.acquire_owned().await.map_err(closed)?;
        let global = self.walks.clone().acquire_owned().await.map_err(closed)?;
        Ok((mine, global))
    }

    fn cached_reach(&self, root: &ChunkId) -> Option<Arc<Reach>> {
        let c = self
            .reach_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.iter().find(|(r, _)| r == root).map(|(_, r)| r.clone())
    }

    fn cache_reach(&self, root: ChunkId, reach: Arc<Reach>) {
        let mut c = self
            .reach_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.retain(|(r, _)| *r != root);
        c.push((root, reach));
        if c.len() > REACH_CACHE {
            c.remove(0);
        }
    }

    /// Everything reachable from snapshot `snap` (cached by root).
    async fn reach(&self, snap: &v1::Snapshot) -> Result<Arc<Reach>, ApplianceError> {
        let root =
            ChunkId::from_slice(&snap.root).map_err(|e| ApplianceError::Internal(e.to_string()))?;
        if let Some(r) = self.cached_reach(&root) {
            return Ok(r);
        }
        let w = self.walk(root, None).await?;
        let all = Arc::new(w.reach);
        self.cache_reach(root, all.clone());
        Ok(all)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Answers each message of a request stream with `f`, up to [`PIPELINE_DEPTH`] at a time, in
/// order; the first error ends the stream with its status.
fn pipelined<Req, Resp, F, Fut>(inner: &Arc<Inner>, input: Streaming<Req>, f: F) -> BoxStream<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(Arc<Inner>, Req) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Resp, ApplianceError>> + Send + 'static,
{
    let inner = inner.clone();
    let f = Arc::new(f);
    Box::pin(
        input
            .map(move |m| {
                let (inner, f) = (inner.clone(), f.clone());
                async move { Ok::<_, Status>(f(inner, m?).await?) }
            })
            .buffered(PIPELINE_DEPTH),
    )
}

/// Runs a catalog call on the blocking pool.
async fn catalog_call<T: Send + 'static>(
    catalog: &Arc<Catalog>,
    f: impl FnOnce(&Catalog) -> Result<T, crate::error::RepoError> + Send + 'static,
) -> Result<T, Status> {
    let catalog = catalog.clone();
    Ok(on_blocking_pool("catalog call", move || Ok(f(&catalog)?)).await?)
}

/// Runs blocking or CPU-heavy work (RocksDB, decoding) on tokio's blocking pool, off the
/// network threads.
async fn on_blocking_pool<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, ApplianceError> + Send + 'static,
) -> Result<T, ApplianceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApplianceError::Internal(format!("{what}: {e}")))?
}

#[tonic::async_trait]
impl Coffer for CofferService {
    async fn hello(
        &self,
        req: Request<v1::HelloRequest>,
    ) -> Result<Response<v1::HelloResponse>, Status> {
        // The protocol version is checked before anything else, credentials included.
        if req.get_ref().protocol_version != coffer_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "this client speaks coffer protocol {} but the appliance speaks {}; upgrade the \
                 older side",
                req.get_ref().protocol_version,
                coffer_proto::PROTOCOL_VERSION
            )));
        }
        let source = req.remote_addr().map(|a| a.ip());
        let req = req.into_inner();
        let (token, identity) = self
            .inner
            .auth
            .login(&req.identity, &req.password, source)
            .await?;
        let h = &self.inner.hello;
        Ok(Response::new(v1::HelloResponse {
            protocol_version: coffer_proto::PROTOCOL_VERSION,
            repository_id: Bytes::copy_from_slice(&h.repository_id),
            mode: v1::EncryptionMode::Managed.into(),
            chunker: Some(h.chunker),
            dedup_key: Bytes::copy_from_slice(&h.dedup_key),
            limits: Some(h.limits),
            appliance_version: env!("CARGO_PKG_VERSION").to_string(),
            disclosure: self.inner.auth.disclosure().into(),
            possession_key: self
                .inner
                .auth
                .state_of(&token)
                .map(|s| Bytes::copy_from_slice(&s.possession_key))
                .unwrap_or_default(),
            compressions: vec![v1::Compression::Lz4.into()],
            identity,
            session_token: token,
        }))
    }

    type FindMissingStream = BoxStream<v1::FindMissingResponse>;

    async fn find_missing(
        &self,
        req: Request<Streaming<v1::FindMissingRequest>>,
    ) -> Result<Response<Self::FindMissingStream>, Status> {
        let session = self.inner.session(&req)?;
        Ok(Response::new(pipelined(
            &self.inner,
            req.into_inner(),
            move |inner, m: v1::FindMissingRequest| {
                let session = session.clone();
                async move {
                    session.state.check()?;
                    inner.find_missing(&session, m.ids).await
                }
            },
        )))
    }

    type PutChunksStream = BoxStream<v1::PutChunksResponse>;

    async fn put_chunks(
        &self,
        req: Request<Streaming<v1::PutChunksRequest>>,
    ) -> Result<Response<Self::PutChunksStream>, Status> {
        let session = self.inner.session(&req)?;
        Ok(Response::new(pipelined(
            &self.inner,
            req.into_inner(),
            move |inner, m| {
                let session = session.clone();
                async move {
                    session.state.check()?;
                    inner.put(&session, m).await
                }
            },
        )))
    }

    type GetChunksStream = BoxStream<v1::GetChunksResponse>;

    async fn get_chunks(
        &self,
        req: Request<Streaming<v1::GetChunksRequest>>,
    ) -> Result<Response<Self::GetChunksStream>, Status> {
        let session = self.inner.session(&req)?;
        let inner = self.inner.clone();
        let out = req
            .into_inner()
            .map(move |m| {
                let (inner, session) = (inner.clone(), session.clone());
                async move {
                    let m = m?;
                    session.state.check()?;
                    let parts = inner.get(&session, m.ids).await?;
                    Ok::<_, Status>(futures::stream::iter(
                        parts.into_iter().map(Ok::<_, Status>),
                    ))
                }
            })
            .buffered(PIPELINE_DEPTH)
            .try_flatten();
        Ok(Response::new(Box::pin(out)))
    }

    async fn commit_snapshot(
        &self,
        req: Request<v1::CommitSnapshotRequest>,
    ) -> Result<Response<v1::CommitSnapshotResponse>, Status> {
        let session = self.inner.session(&req)?;
        let mut snap = req
            .into_inner()
            .snapshot
            .ok_or_else(|| Status::invalid_argument("commit without a snapshot"))?;
        let root = ChunkId::from_slice(&snap.root)
            .map_err(|e| Status::invalid_argument(format!("snapshot root: {e}")))?;
        let id = SnapshotId::from_bytes(rand::random());
        snap.id = Bytes::copy_from_slice(id.as_bytes());
        // A snapshot always belongs to the identity that commits it.
        snap.identity.clone_from(&session.identity);
        snap.hostname = session
            .identity
            .split_once('@')
            .map_or("", |(_, h)| h)
            .to_string();
        if snapshot_access(&self.inner.auth.rules(), &session.identity, &snap)
            .is_none_or(|a| a < Access::Append)
        {
            return Err(Status::permission_denied(format!(
                "{} may not add snapshots of {}",
                session.identity, snap.path
            )));
        }
        // Every tree and chunk the snapshot references must be known to this session: uploaded
        // (verified against its id), proved, or reachable from a snapshot it opened (S2: a chunk
        // id alone never lets anyone put someone else's data into their snapshot). The walk
        // checks each reference before reading it, and does not descend into subtrees
        // reachable from an opened snapshot. A root the session does not know is refused in
        // the same words whether or not it is stored.
        let walk = {
            let _turn = self.inner.walk_permit(&session.identity).await?;
            session.state.check()?;
            self.inner
                .walk(root, Some(session.state.as_ref()))
                .await
                .map_err(|e| Status::failed_precondition(format!("snapshot not committed: {e}")))?
        };
        session.state.check()?;
        if snap.time_us == 0 {
            snap.time_us = coffer_proto::now_us();
        }
        let s2 = snap.clone();
        catalog_call(&self.inner.catalog, move |c| c.commit_snapshot(&s2)).await?;
        if !walk.skipped {
            // The walk saw everything: the new snapshot's reachable set, ready for restores.
            self.inner.cache_reach(root, Arc::new(walk.reach));
        }
        Ok(Response::new(v1::CommitSnapshotResponse { id: snap.id }))
    }

    async fn open_snapshot(
        &self,
        req: Request<v1::OpenSnapshotRequest>,
    ) -> Result<Response<v1::OpenSnapshotResponse>, Status> {
        let session = self.inner.session(&req)?;
        let id = SnapshotId::from_slice(&req.into_inner().id)
            .map_err(|e| Status::invalid_argument(format!("snapshot id: {e}")))?;
        let snap = catalog_call(&self.inner.catalog, move |c| c.snapshot(&id)).await?;
        let snap = match snap {
            Some(s)
                if snapshot_access(&self.inner.auth.rules(), &session.identity, &s).is_some() =>
            {
                s
            }
            // A snapshot the caller may not read is reported exactly like a missing one.
            _ => return Err(Status::not_found(format!("no snapshot {id}"))),
        };
        let reach = {
            let _turn = self.inner.walk_permit(&session.identity).await?;
            self.inner.reach(&snap).await?
        };
        let reachable = reach.len() as u64;
        session.state.check()?;
        session.state.add_opened(snap, reach);
        // Rules may have changed while the trees were walked: what a reload revoked in the
        // meantime stays revoked.
        let rules = self.inner.auth.rules();
        session
            .state
            .retain_opened(|s| snapshot_access(&rules, &session.identity, s).is_some());
        Ok(Response::new(v1::OpenSnapshotResponse { reachable }))
    }

    async fn list_snapshots(
        &self,
        req: Request<v1::ListSnapshotsRequest>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        let session = self.inner.session(&req)?;
        let v1::ListSnapshotsRequest { path, all } = req.into_inner();
        let every = catalog_call(&self.inner.catalog, Catalog::snapshots).await?;
        let rules = self.inner.auth.rules();
        let mut snapshots: Vec<_> = every
            .into_iter()
            .filter(|s| path.is_empty() || s.path == path)
            .filter(|s| all || s.identity == session.identity)
            .filter(|s| snapshot_access(&rules, &session.identity, s).is_some())
            .collect();
        snapshots.sort_by_key(|s| s.time_us);
        Ok(Response::new(v1::ListSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<v1::DeleteSnapshotRequest>,
    ) -> Result<Response<v1::DeleteSnapshotResponse>, Status> {
        let session = self.inner.session(&req)?;
        let id = SnapshotId::from_slice(&req.into_inner().id)
            .map_err(|e| Status::invalid_argument(format!("snapshot id: {e}")))?;
        let rules = self.inner.auth.rules();
        let who = session.identity.clone();
        let outcome = catalog_call(&self.inner.catalog, move |c| {
            let Some(s) = c.snapshot(&id)? else {
                return Ok(None);
            };
            let a = snapshot_access(&rules, &who, &s);
            if a == Some(Access::Full) {
                c.delete_snapshot(&id)?;
            }
            Ok(a)
        })
        .await?;
        match outcome {
            Some(Access::Full) => {
                // Sessions that opened it read from it no longer.
                self.inner.auth.forget_snapshot(id.as_bytes());
                Ok(Response::new(v1::DeleteSnapshotResponse {}))
            }
            Some(_) => Err(Status::permission_denied(format!(
                "{} may read snapshot {id} but not delete it",
                session.identity
            ))),
            // A snapshot the caller may not read is reported exactly like a missing one.
            None => Err(Status::not_found(format!("no snapshot {id}"))),
        }
    }

    async fn get_snapshot(
        &self,
        req: Request<v1::GetSnapshotRequest>,
    ) -> Result<Response<v1::GetSnapshotResponse>, Status> {
        let session = self.inner.session(&req)?;
        let id = SnapshotId::from_slice(&req.into_inner().id)
            .map_err(|e| Status::invalid_argument(format!("snapshot id: {e}")))?;
        let snap = catalog_call(&self.inner.catalog, move |c| c.snapshot(&id)).await?;
        match snap {
            Some(s)
                if snapshot_access(&self.inner.auth.rules(), &session.identity, &s).is_some() =>
            {
                Ok(Response::new(v1::GetSnapshotResponse { snapshot: Some(s) }))
            }
            // A snapshot the caller may not read is reported exactly like a missing one.
            _ => Err(Status::not_found(format!("no snapshot {id}"))),
        }
    }

    async fn change_password(
        &self,
        req: Request<v1::ChangePasswordRequest>,
    ) -> Result<Response<v1::ChangePasswordResponse>, Status> {
        let session = self.inner.session(&req)?;
        let (user, host) = session
            .identity
            .split_once('@')
            .ok_or_else(|| Status::internal("session identity without @"))?;
        let allowed = rules::access(
            &self.inner.auth.rules(),
            &session.identity,
            TargetType::User,
            &[("username", user), ("hostname", host)],
        );
        if allowed.is_none_or(|a| a < Access::Append) {
            return Err(Status::permission_denied(format!(
                "{} may not change its password",
                session.identity
            )));
        }
        let pw = req.into_inner().new_password;
        if pw.chars().count() < crate::access::auth::MIN_PASSWORD_CHARS {
            return Err(Status::invalid_argument(format!(
                "passwords must be at least {} characters",
                crate::access::auth::MIN_PASSWORD_CHARS
            )));
        }
        let hash = self.inner.auth.hash_new_password(pw).await?;
        let identity = session.identity.clone();
        let changed = catalog_call(&self.inner.catalog, move |c| {
            let Some(mut u) = c.user(&identity)? else {
                return Ok(false);
            };
            u.password_hash = hash;
            c.set_user(&u).map(|()| true)
        })
        .await?;
        if !changed {
            // Deleted while this call ran.
            return Err(ApplianceError::NotFound(format!(
                "no account {}: it was deleted",
                session.identity
            ))
            .into());
        }
        // Every session of the account ends (the caller's too): the old password is gone.
        let auth = self.inner.auth.clone();
        on_blocking_pool("reload", move || auth.reload()).await?;
        Ok(Response::new(v1::ChangePasswordResponse {}))
    }

    async fn refresh(
        &self,
        req: Request<v1::RefreshRequest>,
    ) -> Result<Response<v1::RefreshResponse>, Status> {
        self.inner.control_session(&req)?;
        self.inner.auth.reload()?;
        Ok(Response::new(v1::RefreshResponse {}))
    }

    async fn server_status(
        &self,
        req: Request<v1::ServerStatusRequest>,
    ) -> Result<Response<v1::ServerStatusResponse>, Status> {
        self.inner.control_session(&req)?;
        let (users, stored) = catalog_call(&self.inner.catalog, |c| {
            Ok((c.users()?.len(), c.acl_rules()?.len()))
        })
        .await?;
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(v1::ServerStatusResponse {
            appliance_version: env!("CARGO_PKG_VERSION").to_string(),
            shards: u32::from(shard_count(&self.inner.shards)),
            users: count(users),
            sessions: count(self.inner.auth.session_count()),
            acl_rules: count(self.inner.auth.rules().len()),
            acl_defaults: stored == 0,
        }))
    }
}
