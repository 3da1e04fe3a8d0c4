//! An authenticated session: `Hello` first (protocol version, credentials), then calls that carry
//! the session token.

use bytes::Bytes;
use coffer_proto::v1::coffer_client::CofferClient;
use coffer_proto::v1::{self};
use coffer_proto::{bitmap_get, pack_ids, ChunkId, DedupKey, SnapshotId};
use futures::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::connect::{channel, Target};
use super::deadline::{Deadlines, WithDeadlines};
use super::frame::{codec_for, Codec, Frame};
use crate::keyring::Member;
use crate::ClientError;
use std::sync::Arc;

/// Times a commit is asked again after losing its connection before the answer.
pub const COMMIT_RETRIES: u32 = 3;

/// Credentials and where to connect.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub target: Target,
    /// `username@hostname`.
    pub identity: String,
    pub password: String,
    /// How long calls may take (see [`Deadlines`]).
    pub deadlines: Deadlines,
    /// The keyring member this client is (sealed repositories only; see `crate::keyring`).
    pub keyring: Option<Arc<Member>>,
}

#[derive(Clone)]
struct Token(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert(coffer_proto::SESSION_HEADER, self.0.clone());
        Ok(req)
    }
}

type Client = CofferClient<InterceptedService<WithDeadlines<Channel>, Token>>;

/// The largest chunk the client ever accepts, whatever the appliance announces: FastCDC's
/// largest maximum (16 MiB).
pub const MAX_CHUNK_BYTES: usize = coffer_proto::ChunkerParams::MAX_MAX as usize;
/// The largest message the client ever accepts.
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// What the appliance needs for a chunk (`FindMissing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Stored and known to this session: nothing to send.
    Present,
    /// Send the chunk.
    Missing,
    /// Stored, but unknown to this session: send a possession proof before a snapshot may
    /// reference it (repository disclosure).
    Prove,
}

/// Totals of an upload.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PutStats {
    pub stored: u64,
    pub deduplicated: u64,
    pub stored_bytes: u64,
    pub sent_bytes: u64,
}

/// What one `FindMissing` answer says of the `n` ids of its batch.
///
/// # Errors
/// [`ClientError::Protocol`] when it answers another number of ids.
pub(crate) fn answered_needs(
    r: &v1::FindMissingResponse,
    n: usize,
) -> Result<Vec<Need>, ClientError> {
    if r.count as usize != n {
        return Err(ClientError::Protocol(
            "FindMissing answered another batch size".into(),
        ));
    }
    Ok((0..n)
        .map(|i| {
            if bitmap_get(&r.missing, i) {
                Need::Missing
            } else if bitmap_get(&r.prove, i) {
                Need::Prove
            } else {
                Need::Present
            }
        })
        .collect())
}

/// The plaintext of one chunk the appliance answered for `want`: its size within the client's
/// own limit (`limit`, never the appliance's word alone), decompressed to exactly its raw
/// length, and hashing to `want`.
///
/// # Errors
/// [`ClientError::Protocol`] for another chunk or an oversized one; [`ClientError::Corrupt`]
/// for bytes that do not decode or hash to `want`.
pub(crate) fn answered_chunk(
    want: &ChunkId,
    f: v1::ChunkFrame,
    limit: usize,
    dedup_key: &DedupKey,
) -> Result<Bytes, ClientError> {
    if f.id[..] != want.as_bytes()[..] {
        return Err(ClientError::Protocol(format!("expected chunk {want}")));
    }
    answered_plain(want, f, limit, dedup_key)
}

/// A sealed repository's answer for `want`: an envelope within the bound, opened and checked
/// by the keyring member ([`Member::open_chunk`]).
///
/// # Errors
/// As [`answered_chunk`]; a member that cannot read.
pub(crate) fn answered_sealed(
    want: &ChunkId,
    f: &v1::ChunkFrame,
    limit: usize,
    member: &Member,
) -> Result<Bytes, ClientError> {
    if f.id[..] != want.as_bytes()[..] {
        return Err(ClientError::Protocol(format!("expected chunk {want}")));
    }
    let bound = limit + coffer_proto::sealed::ENVELOPE_OVERHEAD;
    if f.data.len() > bound || f.compression != i32::from(v1::Compression::None) {
        return Err(ClientError::Protocol(format!(
            "the appliance sent chunk {want} as a {}-byte envelope, more than the {bound} one \
             may have (or compressed); refusing it",
            f.data.len()
        )));
    }
    member.open_chunk(want, &f.data, limit)
}

fn answered_plain(
    want: &ChunkId,
    f: v1::ChunkFrame,
    limit: usize,
    dedup_key: &DedupKey,
) -> Result<Bytes, ClientError> {
    if f.raw_len as usize > limit || f.data.len() > coffer_proto::codec::max_stored_len(limit) {
        return Err(ClientError::Protocol(format!(
            "the appliance sent chunk {want} as {} bytes ({} stored), more than the {limit} a \
             chunk may have; refusing it",
            f.raw_len,
            f.data.len()
        )));
    }
    let plain: Bytes = match v1::Compression::try_from(f.compression) {
        Ok(v1::Compression::None) => f.data,
        Ok(c @ (v1::Compression::Zstd | v1::Compression::Lz4)) => {
            coffer_proto::codec::decode(c, &f.data, f.raw_len as usize)
                .map_err(|_| ClientError::Corrupt(want.to_hex()))?
                .into()
        }
        _ => return Err(ClientError::Corrupt(want.to_hex())),
    };
    if coffer_proto::chunk_id(dedup_key, &plain) != *want {
        return Err(ClientError::Corrupt(want.to_hex()));
    }
    Ok(plain)
}

/// A logged-in connection to an appliance.
#[derive(Clone)]
pub struct Session {
    client: Client,
    /// What the appliance said in `Hello`.
    pub hello: v1::HelloResponse,
    dedup_key: DedupKey,
    /// Sealed repositories: the keyring member this session seals and opens with.
    member: Option<Arc<Member>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({})", self.hello.identity)
    }
}

impl Session {
    /// Connects (TLS, pinned), checks the protocol version and logs in.
    ///
    /// # Errors
    /// Connection, version or credential failures.
    pub async fn connect(opts: &SessionOptions) -> Result<Self, ClientError> {
        let ch = WithDeadlines::new(channel(&opts.target).await?, opts.deadlines);
        let mut raw = CofferClient::new(ch.clone());
        let hello = raw
            .hello(v1::HelloRequest {
                protocol_version: coffer_proto::PROTOCOL_VERSION,
                identity: opts.identity.clone(),
                password: opts.password.clone(),
                client_name: format!("coffer {}", env!("CARGO_PKG_VERSION")),
            })
            .await?
            .into_inner();
        let sealed = hello.mode == i32::from(v1::EncryptionMode::Sealed);
        let member =
            match (sealed, &opts.keyring) {
                (true, Some(m)) => Some(m.clone()),
                (true, None) => return Err(ClientError::Keyring(
                    "the appliance's repository is sealed: this client needs its keyring member \
                     file (`coffer connect ... --keyring FILE`, from `coffer keyring \
                     add-member` or an enrollment token)"
                        .into(),
                )),
                (false, Some(_)) => {
                    return Err(ClientError::Keyring(
                        "the appliance's repository is managed (the appliance holds the keys): a \
                     keyring is for sealed repositories; connect without one"
                            .into(),
                    ))
                }
                (false, None) => None,
            };
        let dedup_key = match &member {
            // A log-only member never hashes chunks: its key is never used.
            Some(m) => m.id_key().unwrap_or(DedupKey::from_bytes([0; 32])),
            None => DedupKey::from_slice(&hello.dedup_key)
                .map_err(|_| ClientError::Protocol("dedup key is not 32 bytes".into()))?,
        };
        let limits = hello
            .limits
            .ok_or_else(|| ClientError::Protocol("Hello without limits".into()))?;
        let token = MetadataValue::try_from(hello.session_token.as_str())
            .map_err(|_| ClientError::Protocol("session token is not ASCII".into()))?;
        // The appliance's word bounds what we accept only under the client's own ceilings.
        let max = (limits.max_message_size as usize).min(MAX_MESSAGE_BYTES);
        let client = CofferClient::with_interceptor(ch, Token(token))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        Ok(Self {
            client,
            hello,
            dedup_key,
            member,
        })
    }

    /// The largest chunk this client accepts from the appliance: the repository's chunker
    /// maximum, never more than [`MAX_CHUNK_BYTES`] whatever the appliance says.
    #[must_use]
    pub fn max_chunk(&self) -> usize {
        self.hello
            .chunker
            .map_or(MAX_CHUNK_BYTES, |c| c.max_size as usize)
            .min(MAX_CHUNK_BYTES)
    }

    /// The limits the appliance announced.
    #[must_use]
    pub fn limits(&self) -> v1::Limits {
        self.hello.limits.unwrap_or_default()
    }

    /// The repository's dedup key (chunk ids are keyed BLAKE3 under it); in a sealed
    /// repository the keyring's id key.
    #[must_use]
    pub fn dedup_key(&self) -> &DedupKey {
        &self.dedup_key
    }

    /// Whether the account may only add snapshots (`Hello` says so): nothing is listed or read.
    #[must_use]
    pub fn write_only(&self) -> bool {
        self.hello.role == "write-only"
    }

    /// How the appliance knows `path`: itself, or in a sealed repository its tag (`None` for a
    /// member without the path key).
    #[must_use]
    pub fn path_as_stored(&self, path: &str) -> Option<String> {
        match &self.member {
            Some(m) => m.path_tag(path).ok(),
            None => Some(path.to_string()),
        }
    }

    /// The keyring member of a sealed repository's session (`None`: managed).
    #[must_use]
    pub fn member(&self) -> Option<&Arc<Member>> {
        self.member.as_ref()
    }

    /// The largest tree object this session builds: the chunk maximum, or half of it in a
    /// sealed repository (the envelope declares the tree's references beside it).
    #[must_use]
    pub fn max_object(&self) -> usize {
        let max = self
            .hello
            .chunker
            .map_or(MAX_CHUNK_BYTES, |c| c.max_size as usize);
        if self.member.is_some() {
            max / 2
        } else {
            max
        }
    }

    /// The codec for a chunk of a file of `size` bytes (see [`codec_for`]).
    #[must_use]
    pub fn codec_for(&self, level: Option<i32>, size: u64, extents: bool) -> Codec {
        let lz4 = self
            .hello
            .compressions
            .contains(&v1::Compression::Lz4.into());
        codec_for(lz4, level, size, extents)
    }

    /// The id of `plain`.
    #[must_use]
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        coffer_proto::chunk_id(&self.dedup_key, plain)
    }

    /// For each id, whether the appliance lacks it (only [`Need::Missing`] counts; see
    /// [`Session::need`]).
    ///
    /// # Errors
    /// RPC failures.
    pub async fn find_missing(&self, ids: &[ChunkId]) -> Result<Vec<bool>, ClientError> {
        Ok(self
            .need(ids)
            .await?
            .into_iter()
            .map(|n| n == Need::Missing)
            .collect())
    }

    /// The key of this session's possession proofs.
    #[must_use]
    pub fn possession_key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        if self.hello.possession_key.len() == 32 {
            k.copy_from_slice(&self.hello.possession_key);
        }
        k
    }

    /// Makes a snapshot's chunks readable (and referable) in this session; returns how many
    /// trees and chunks it reaches.
    ///
    /// # Errors
    /// RPC failures; `NOT_FOUND` for snapshots the user may not read.
    pub async fn open(&self, id: &SnapshotId) -> Result<u64, ClientError> {
        Ok(self.open_snapshot(id).await?.reachable)
    }

    /// [`Session::open`], answering the chunks reachable from the snapshot that the appliance
    /// found damaged (bit rot): files that use them must be read again, not reused.
    ///
    /// # Errors
    /// As [`Session::open`]; a malformed damaged list.
    pub async fn open_damaged(&self, id: &SnapshotId) -> Result<Vec<ChunkId>, ClientError> {
        let r = self.open_snapshot(id).await?;
        coffer_proto::unpack_ids(&r.damaged, 1 << 16).map_err(|e| {
            ClientError::Protocol(format!(
                "OpenSnapshot answered a malformed damaged list: {e}"
            ))
        })
    }

    async fn open_snapshot(
        &self,
        id: &SnapshotId,
    ) -> Result<v1::OpenSnapshotResponse, ClientError> {
        Ok(self
            .client
            .clone()
            .open_snapshot(v1::OpenSnapshotRequest {
                id: Bytes::copy_from_slice(id.as_bytes()),
            })
            .await?
            .into_inner())
    }

    /// What the appliance needs for each id (one stream, batches pipelined).
    ///
    /// # Errors
    /// RPC failures.
    pub async fn need(&self, ids: &[ChunkId]) -> Result<Vec<Need>, ClientError> {
        self.need_sealed(ids, &[]).await
    }

    /// [`Session::need`] in a sealed repository: with the BLAKE3 hash of each chunk's envelope
    /// (`hashes[i]` for `ids[i]`; empty: none), so that a stored record that differs from this
    /// client's envelope (a poisoned one) is answered missing and replaced by the upload.
    ///
    /// # Errors
    /// RPC failures.
    pub async fn need_sealed(
        &self,
        ids: &[ChunkId],
        hashes: &[[u8; 32]],
    ) -> Result<Vec<Need>, ClientError> {
        let per = (self.limits().max_ids_per_batch as usize).clamp(1, 16 * 1024);
        let batches: Vec<Vec<ChunkId>> = ids.chunks(per).map(<[ChunkId]>::to_vec).collect();
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        let mut hash_parts = hashes.chunks(per);
        let reqs: Vec<v1::FindMissingRequest> = batches
            .into_iter()
            .map(|b| v1::FindMissingRequest {
                ids: pack_ids(&b).into(),
                envelope_hashes: hash_parts
                    .next()
                    .map(<[[u8; 32]]>::concat)
                    .unwrap_or_default()
                    .into(),
            })
            .collect();
        let mut resp = self
            .client
            .clone()
            .find_missing(tokio_stream::iter(reqs))
            .await?
            .into_inner();
        let mut out = Vec::with_capacity(ids.len());
        for n in sizes {
            let r = resp
                .message()
                .await?
                .ok_or_else(|| ClientError::Protocol("FindMissing ended early".into()))?;
            out.extend(answered_needs(&r, n)?);
        }
        Ok(out)
    }

    /// Uploads frames in batches of about `batch_bytes`, pipelined on one stream. Returns once
    /// every batch was acknowledged (durable on the appliance).
    ///
    /// # Errors
    /// RPC failures, including `INVALID_ARGUMENT` for chunks the appliance rejects.
    pub async fn put(
        &self,
        frames: Vec<Frame>,
        batch_bytes: usize,
    ) -> Result<PutStats, ClientError> {
        let limits = self.limits();
        let max_bytes = batch_bytes.min(limits.max_message_size as usize / 2).max(1);
        let max_n = (limits.max_chunks_per_batch as usize).max(1);
        let mut batches = Vec::new();
        let mut cur: Vec<v1::ChunkFrame> = Vec::new();
        let mut cur_bytes = 0;
        let mut sent_bytes = 0u64;
        for f in frames {
            if !cur.is_empty() && (cur_bytes + f.data.len() > max_bytes || cur.len() >= max_n) {
                batches.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
            cur_bytes += f.data.len();
            sent_bytes += f.data.len() as u64;
            cur.push(v1::ChunkFrame {
                id: Bytes::copy_from_slice(f.id.as_bytes()),
                raw_len: f.raw_len,
                compression: f.compression.into(),
                data: f.data,
            });
        }
        if !cur.is_empty() {
            batches.push(cur);
        }
        let n = batches.len();
        let reqs = batches
            .into_iter()
            .enumerate()
            .map(|(i, chunks)| v1::PutChunksRequest {
                batch: i as u64,
                chunks,
            });
        let mut resp = self
            .client
            .clone()
            .put_chunks(tokio_stream::iter(reqs))
            .await?
            .into_inner();
        let mut stats = PutStats {
            sent_bytes,
            ..PutStats::default()
        };
        for i in 0..n {
            let r = resp.message().await?.ok_or_else(|| {
                ClientError::Protocol("PutChunks ended before every batch was acknowledged".into())
            })?;
            if r.batch != i as u64 {
                return Err(ClientError::Protocol(format!(
                    "acknowledgement for batch {} instead of {i}",
                    r.batch
                )));
            }
            stats.stored += u64::from(r.stored);
            stats.deduplicated += u64::from(r.deduplicated);
            stats.stored_bytes += r.stored_bytes;
        }
        Ok(stats)
    }

    /// Reads chunks back and checks each against its id. Returns plaintexts in request order.
    ///
    /// # Errors
    /// RPC failures; [`ClientError::Corrupt`] when bytes do not hash to their id.
    pub async fn get(&self, ids: &[ChunkId]) -> Result<Vec<Bytes>, ClientError> {
        let per = 256;
        let reqs: Vec<v1::GetChunksRequest> = ids
            .chunks(per)
            .map(|b| v1::GetChunksRequest {
                ids: pack_ids(b).into(),
            })
            .collect();
        let mut resp = self
            .client
            .clone()
            .get_chunks(tokio_stream::iter(reqs))
            .await?
            .into_inner();
        let mut out = Vec::with_capacity(ids.len());
        while out.len() < ids.len() {
            let Some(r) = resp.next().await.transpose()? else {
                return Err(ClientError::Protocol("GetChunks ended early".into()));
            };
            for f in r.chunks {
                let want = ids
                    .get(out.len())
                    .ok_or_else(|| ClientError::Protocol("too many chunks".into()))?;
                out.push(match &self.member {
                    Some(m) => answered_sealed(want, &f, self.max_chunk(), m)?,
                    None => answered_chunk(want, f, self.max_chunk(), &self.dedup_key)?,
                });
            }
        }
        Ok(out)
    }

    /// Commits a snapshot whose root tree chunk is already stored, under a fresh random commit
    /// id (see [`Session::commit_as`]).
    ///
    /// # Errors
    /// RPC failures; a connection still lost after the retries.
    pub async fn commit(&self, snap: v1::Snapshot) -> Result<SnapshotId, ClientError> {
        self.commit_as(snap, rand::random()).await
    }

    /// Commits a snapshot under `commit_id` (one per snapshot), which makes the commit
    /// idempotent: when the connection is lost before the answer, the commit is asked again with
    /// it (up to [`COMMIT_RETRIES`] times, waiting 0.25, 0.5, 1 s) and the appliance answers the
    /// snapshot the first attempt made, never a second one.
    ///
    /// # Errors
    /// RPC failures; a connection still lost after the retries.
    pub async fn commit_as(
        &self,
        snap: v1::Snapshot,
        commit_id: [u8; 16],
    ) -> Result<SnapshotId, ClientError> {
        let snap = match &self.member {
            Some(m) => self.seal_snapshot(m, snap)?,
            None => snap,
        };
        let mut retries = COMMIT_RETRIES;
        let mut wait = std::time::Duration::from_millis(250);
        loop {
            let r = self
                .client
                .clone()
                .commit_snapshot(v1::CommitSnapshotRequest {
                    snapshot: Some(snap.clone()),
                    commit_id: Bytes::copy_from_slice(&commit_id),
                })
                .await;
            match r {
                Ok(r) => {
                    return SnapshotId::from_slice(&r.into_inner().id)
                        .map_err(|e| ClientError::Protocol(e.to_string()));
                }
                // The commit may have happened and only its answer been lost: ask again with
                // the same commit id, which the appliance answers with the snapshot it made.
                Err(s)
                    if retries > 0
                        && (crate::error::connection_lost(&s)
                            || s.code() == tonic::Code::Unavailable) =>
                {
                    retries -= 1;
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(s) => return Err(s.into()),
            }
        }
    }

    /// This user's snapshots (with `all`: every snapshot it may read), oldest first; `path`
    /// filters when not empty.
    ///
    /// # Errors
    /// RPC failures.
    pub async fn list(&self, path: &str, all: bool) -> Result<Vec<v1::Snapshot>, ClientError> {
        // Sealed: the appliance knows paths by their tags; a member without the path key
        // (log-only) filters what it opened instead.
        let (asked, filter) = match (&self.member, path) {
            (Some(m), p) if !p.is_empty() => match m.path_tag(p) {
                Ok(tag) => (tag, None),
                Err(_) => (String::new(), Some(p)),
            },
            _ => (path.to_string(), None),
        };
        let snaps = self
            .client
            .clone()
            .list_snapshots(v1::ListSnapshotsRequest { path: asked, all })
            .await?
            .into_inner()
            .snapshots;
        match &self.member {
            Some(m) => Ok(snaps
                .into_iter()
                .map(|s| unsealed(m, s))
                .filter(|s| filter.is_none_or(|p| s.path == p))
                .collect()),
            None => Ok(snaps),
        }
    }

    /// A sealed repository's snapshot as it goes to the appliance: the path replaced by its
    /// tag, tags and path sealed with the rest of the header, signed by this member.
    fn seal_snapshot(
        &self,
        m: &Member,
        mut snap: v1::Snapshot,
    ) -> Result<v1::Snapshot, ClientError> {
        let body = v1::HeaderBody {
            keyring_id: Bytes::copy_from_slice(&m.keyring_id),
            identity: self.hello.identity.clone(),
            path: snap.path.clone(),
            hostname: snap.hostname.clone(),
            tags: std::mem::take(&mut snap.tags),
            root: snap.root.clone(),
            parent: snap.parent.clone(),
            stats: snap.stats,
            partial: snap.partial,
            client_time_us: coffer_proto::now_us(),
        };
        snap.path = m.path_tag(&snap.path)?;
        snap.sealed = m.seal_header(&body)?.into();
        Ok(snap)
    }

    /// The effective policy for `path` (absolute), as the appliance serves it.
    ///
    /// # Errors
    /// RPC failures (`PERMISSION_DENIED` without READ on the path's policy).
    pub async fn policy(&self, path: &str) -> Result<crate::policy::BackupPolicy, ClientError> {
        // Sealed: the appliance knows the path by its tag only (path-level policies are set
        // for the tag); a member without the path key asks for its account's policy.
        let asked = match &self.member {
            Some(m) => m.path_tag(path).unwrap_or_else(|_| "/".into()),
            None => path.to_string(),
        };
        let r = self
            .client
            .clone()
            .get_policy(v1::GetPolicyRequest { path: asked })
            .await?
            .into_inner();
        let mut p = crate::policy::BackupPolicy::from_fields(&r.fields)?;
        p.scheduled = r
            .scheduled
            .into_iter()
            .map(|s| (s.path, s.schedule))
            .collect();
        Ok(p)
    }

    /// Ends the session (best effort: a session not ended expires on the appliance after 30
    /// idle minutes). Until then the appliance keeps what it uploaded safe from garbage
    /// collection and holds its memory.
    pub async fn end(&self) {
        let _ = self
            .client
            .clone()
            .end_session(v1::EndSessionRequest {})
            .await;
    }

    /// Deletes a snapshot; `delete_passphrase` is the account's step-up passphrase (empty
    /// when it has none), sent with this call only.
    ///
    /// # Errors
    /// RPC failures (`NOT_FOUND` for unknown or invisible snapshots, `PERMISSION_DENIED` when
    /// it is protected or locked, or the passphrase is wrong).
    pub async fn delete(
        &self,
        id: &SnapshotId,
        delete_passphrase: &str,
    ) -> Result<(), ClientError> {
        self.client
            .clone()
            .delete_snapshot(v1::DeleteSnapshotRequest {
                id: Bytes::copy_from_slice(id.as_bytes()),
                delete_passphrase: delete_passphrase.to_string(),
            })
            .await?;
        Ok(())
    }

    /// Protects a snapshot until `until_us` (0: until unprotected), or with `protect: false`
    /// removes its protection (needs the step-up passphrase when the account has one).
    ///
    /// # Errors
    /// RPC failures.
    pub async fn protect(
        &self,
        id: &SnapshotId,
        protect: bool,
        until_us: i64,
        delete_passphrase: &str,
    ) -> Result<v1::Snapshot, ClientError> {
        self.client
            .clone()
            .protect_snapshot(v1::ProtectSnapshotRequest {
                id: Bytes::copy_from_slice(id.as_bytes()),
                protect,
                until_us,
                delete_passphrase: delete_passphrase.to_string(),
            })
            .await?
            .into_inner()
            .snapshot
            .ok_or_else(|| ClientError::Protocol("ProtectSnapshot answered no snapshot".into()))
    }

    /// Extends a snapshot's retention lock to `until_us`.
    ///
    /// # Errors
    /// RPC failures (`PERMISSION_DENIED` for a shorter lock).
    pub async fn lock(&self, id: &SnapshotId, until_us: i64) -> Result<v1::Snapshot, ClientError> {
        self.client
            .clone()
            .lock_snapshot(v1::LockSnapshotRequest {
                id: Bytes::copy_from_slice(id.as_bytes()),
                until_us,
            })
            .await?
            .into_inner()
            .snapshot
            .ok_or_else(|| ClientError::Protocol("LockSnapshot answered no snapshot".into()))
    }

    /// Sets fields of a policy level (`policy_json`) and clears `unset` ones.
    ///
    /// # Errors
    /// RPC failures.
    pub async fn set_policy(
        &self,
        target: &str,
        policy_json: &str,
        unset: &[String],
        delete_passphrase: &str,
    ) -> Result<String, ClientError> {
        Ok(self
            .client
            .clone()
            .set_policy(v1::SetPolicyRequest {
                target: target.to_string(),
                policy_json: policy_json.to_string(),
                unset: unset.to_vec(),
                delete_passphrase: delete_passphrase.to_string(),
            })
            .await?
            .into_inner()
            .policy_json)
    }

    /// The raw client, for calls this type does not wrap (tests, tools).
    #[must_use]
    pub fn raw(
        &self,
    ) -> CofferClient<
        InterceptedService<WithDeadlines<Channel>, impl tonic::service::Interceptor + Clone>,
    > {
        self.client.clone()
    }

    /// One snapshot.
    ///
    /// # Errors
    /// RPC failures (`NOT_FOUND` for unknown or invisible snapshots).
    pub async fn snapshot(&self, id: &SnapshotId) -> Result<v1::Snapshot, ClientError> {
        let s = self
            .client
            .clone()
            .get_snapshot(v1::GetSnapshotRequest {
                id: Bytes::copy_from_slice(id.as_bytes()),
            })
            .await?
            .into_inner()
            .snapshot
            .ok_or_else(|| ClientError::Protocol("GetSnapshot without a snapshot".into()))?;
        match &self.member {
            // Restores and diffs start here: a header that does not verify stops them.
            Some(m) => {
                let (body, _) = m.open_header(&s)?;
                Ok(with_header(s, body))
            }
            None => Ok(s),
        }
    }
}

/// A listed snapshot of a sealed repository with its real path, tags and writer filled in from
/// its verified header; one whose header does not verify keeps the appliance's fields and is
/// marked `UNVERIFIED: …` in its tags (listed, so that it is seen; never restored: see
/// [`Session::snapshot`]).
fn unsealed(m: &Member, s: v1::Snapshot) -> v1::Snapshot {
    match m.open_header(&s) {
        Ok((body, _)) => with_header(s, body),
        Err(e) => {
            let mut s = s;
            s.tags = vec![format!("UNVERIFIED: {e}")];
            s
        }
    }
}

/// What the signed header says, in place of what the appliance showed (the hostname stays the
/// account's: a member cannot label its snapshots with another machine).
fn with_header(mut s: v1::Snapshot, body: v1::HeaderBody) -> v1::Snapshot {
    s.path = body.path;
    s.tags = body.tags;
    s.stats = body.stats;
    s.partial = body.partial;
    s.parent = body.parent;
    s
}
