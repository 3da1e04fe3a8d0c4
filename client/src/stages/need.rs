//! The need stage: asks the appliance (`FindMissing`) what it needs for each chunk of a batch and
//! keeps only those it lacks or wants proved; chunks it holds and this session may reference go
//! no further. Chunks repeated within one backup never get this far: the upload batcher
//! ([`super::upload::Uploads`]) passes each id once.

use std::sync::Arc;

use coffer_proto::ChunkId;

use super::chunk::Chunk;
use crate::keyring::Member;
use crate::net::{Codec, Need, Session};
use crate::ClientError;

/// The chunks of `batch` the appliance needs, each with what it needs: the bytes
/// ([`Need::Missing`]) or a possession proof ([`Need::Prove`]).
///
/// # Errors
/// RPC failures.
pub async fn needed(
    session: &Session,
    batch: Vec<(Chunk, Codec)>,
) -> Result<Vec<((Chunk, Codec), Need)>, ClientError> {
    let (batch, hashes) = match session.member() {
        Some(m) => seal(m.clone(), batch).await?,
        None => (batch, Vec::new()),
    };
    let ids: Vec<ChunkId> = batch.iter().map(|c| c.0.id).collect();
    let needs = session.need_sealed(&ids, &hashes).await?;
    Ok(batch
        .into_iter()
        .zip(needs)
        .filter(|(_, n)| *n != Need::Present)
        .collect())
}

/// Sealed repositories: each chunk of `batch` as the envelope that will be sent (compressed
/// with its codec inside, then sealed: `Member::seal_chunk`), and the BLAKE3 hash of each
/// envelope for `FindMissing`. CPU work, on a blocking thread.
///
/// # Errors
/// A member that cannot write; a tree this client built that does not decode (a bug).
async fn seal(
    m: Arc<Member>,
    batch: Vec<(Chunk, Codec)>,
) -> Result<(Vec<(Chunk, Codec)>, Vec<[u8; 32]>), ClientError> {
    tokio::task::spawn_blocking(move || {
        let mut hashes = Vec::with_capacity(batch.len());
        let mut out = Vec::with_capacity(batch.len());
        for (c, codec) in batch {
            let refs = c.kind.refs(&c.data).map_err(|e| {
                ClientError::Protocol(format!("tree object {} of this backup: {e}", c.id))
            })?;
            let env = m.seal_chunk(&refs, c.data, codec)?;
            hashes.push(*blake3::hash(&env).as_bytes());
            out.push((
                Chunk {
                    id: c.id,
                    data: env.into(),
                    kind: c.kind,
                },
                Codec::None,
            ));
        }
        Ok((out, hashes))
    })
    .await?
}
